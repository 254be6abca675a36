//! Savepoints in a transaction that spans nodes. Each node's part of the transaction is
//! a Postgres transaction of its own, so a savepoint must exist on every node: the
//! session notes the savepoints it has open (`Session::savepoints`), sends `SAVEPOINT`,
//! `RELEASE` and `ROLLBACK TO` to the transaction's other nodes before the current node
//! answers the client, and a node joining the transaction later gets the open
//! savepoints right after its BEGIN (so a `ROLLBACK TO` undoes whatever that node did
//! since, as on one Postgres).

use super::Session;
use crate::error::RouterError;
use crate::plan::quote_ident;
use crate::protocol::TxnStatus;
use tokio::io::{AsyncRead, AsyncWrite};

/// A savepoint command and its savepoint's name (as Postgres compares it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SavepointOp {
    Set(String),
    Release(String),
    RollbackTo(String),
}

impl SavepointOp {
    /// The command, to send to another node.
    pub(super) fn sql(&self) -> String {
        match self {
            SavepointOp::Set(n) => format!("SAVEPOINT {}", quote_ident(n)),
            SavepointOp::Release(n) => format!("RELEASE SAVEPOINT {}", quote_ident(n)),
            SavepointOp::RollbackTo(n) => format!("ROLLBACK TO SAVEPOINT {}", quote_ident(n)),
        }
    }
}

/// Whether `sql` starts as a savepoint command does (`SAVEPOINT`, `RELEASE`,
/// `ROLLBACK ... TO`), parsable by `savepoint_op` or not.
pub(super) fn is_savepoint_command(sql: &str) -> bool {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    match words.next() {
        Some(w) if is(w, "savepoint") || is(w, "release") => true,
        Some(w) if is(w, "rollback") => words.take(2).any(|w| is(w, "to")),
        _ => false,
    }
}

/// `SAVEPOINT n`, `RELEASE [SAVEPOINT] n`, `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT]
/// n` as one statement (comments allowed); `None` for anything else.
pub(super) fn savepoint_op(sql: &str) -> Option<SavepointOp> {
    // Comments dropped, whitespace collapsed; one statement only.
    let norm = crate::plan::normalize(sql);
    if norm.multi {
        return None;
    }
    let s = norm.text.trim().trim_end_matches(';').trim_end();
    let words = words(s)?;
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    let (kind, name) = match words.as_slice() {
        [w, n] if is(w, "savepoint") => (0, n),
        [w, s, n] if is(w, "release") && is(s, "savepoint") => (1, n),
        [w, n] if is(w, "release") => (1, n),
        [w, rest @ ..] if is(w, "rollback") => {
            let rest = match rest {
                [x, r @ ..] if is(x, "work") || is(x, "transaction") => r,
                r => r,
            };
            match rest {
                [t, s, n] if is(t, "to") && is(s, "savepoint") => (2, n),
                [t, n] if is(t, "to") => (2, n),
                _ => return None,
            }
        }
        _ => return None,
    };
    let name = ident(name)?;
    Some(match kind {
        0 => SavepointOp::Set(name),
        1 => SavepointOp::Release(name),
        _ => SavepointOp::RollbackTo(name),
    })
}

/// Whitespace-separated words, a double-quoted one kept whole (with its quotes).
fn words(s: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let end = if rest.starts_with('"') {
            // Up to the closing quote (a doubled quote is part of the name).
            let b = rest.as_bytes();
            let mut i = 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => break i + 1,
                    Some(_) => i += 1,
                }
            }
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    Some(out)
}

/// An identifier as Postgres folds it: `"Quoted"` as written (doubled quotes undone),
/// an unquoted one in lower case.
fn ident(w: &str) -> Option<String> {
    if let Some(inner) = w.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return None;
        }
        return Some(truncate_name(inner.replace("\"\"", "\"")));
    }
    let ok = w
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && w.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    // Postgres folds ASCII letters only, and cuts names at 63 bytes.
    ok.then(|| truncate_name(w.to_ascii_lowercase()))
}

/// A name cut at Postgres's 63 bytes (on a character boundary).
fn truncate_name(mut n: String) -> String {
    const MAX: usize = 63;
    if n.len() > MAX {
        let mut at = MAX;
        while !n.is_char_boundary(at) {
            at -= 1;
        }
        n.truncate(at);
    }
    n
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A savepoint command the current node is about to get: the transaction's other
    /// nodes run it first, and the session notes it. In a failed transaction only
    /// `ROLLBACK TO` goes on (Postgres refuses the others there).
    pub(super) async fn savepoint_elsewhere(
        &mut self,
        op: &SavepointOp,
    ) -> Result<(), RouterError> {
        if !self.expect.is_empty() {
            // Pipelined statements before it may still fail the transaction.
            self.write_backend().await?;
            self.pump().await?;
            self.after_request().await;
        }
        if self.status == TxnStatus::Failed && !matches!(op, SavepointOp::RollbackTo(_)) {
            return Ok(());
        }
        if let SavepointOp::Release(n) | SavepointOp::RollbackTo(n) = op
            && !self.savepoints.iter().any(|(s, _)| s == n)
        {
            // No such savepoint anywhere: the current node says so (3B001), as
            // Postgres does, and the transaction fails there.
            return Ok(());
        }
        let sql = op.sql();
        // A ROLLBACK TO undoes the settings made since its savepoint: those need not
        // reach a node first.
        let upto = match op {
            SavepointOp::RollbackTo(n) => self
                .savepoints
                .iter()
                .rposition(|(s, _)| s == n)
                .map_or(self.txn_settings.len(), |i| self.savepoints[i].1),
            _ => self.txn_settings.len(),
        };
        let mut failed = None;
        for i in 0..self.parked.len() {
            let node = self.parked[i].0;
            if self.parked[i].1.conn().status == TxnStatus::Idle {
                // A lease kept between transactions (session pooling): not a part of
                // this one (it gets the savepoints when it joins).
                continue;
            }
            // The settings made since it last ran go before the savepoint command, as
            // on the node that ran them.
            let mut all = String::new();
            let from = self.applied_on(node);
            if from < upto {
                self.replay_settings(from, upto, &mut all);
            }
            super::route::push_statement(&mut all, Some(sql.clone()));
            let conn = self.parked[i].1.conn();
            if let Err(e) = conn.run_internal(&all).await {
                failed = Some(e);
                break;
            }
            if from < upto {
                self.note_applied(node, upto);
            }
        }
        if let Some(e) = failed {
            // The nodes no longer agree on the savepoint: the transaction cannot commit.
            self.doomed = true;
            return Err(crate::plan::PlanError::NotSupported(format!(
                "{sql} failed on another node of this transaction ({e}); the transaction can only be rolled back"
            ))
            .into());
        }
        match op {
            SavepointOp::Set(n) => self.savepoints.push((n.clone(), self.txn_settings.len())),
            SavepointOp::Release(n) => {
                if let Some(i) = self.savepoints.iter().rposition(|(s, _)| s == n) {
                    self.savepoints.truncate(i);
                }
            }
            SavepointOp::RollbackTo(n) => {
                if let Some(i) = self.savepoints.iter().rposition(|(s, _)| s == n) {
                    self.savepoints.truncate(i + 1);
                    // The SETs run since the savepoint are undone with it, on every
                    // node that ran them.
                    let kept = self.savepoints[i].1;
                    self.txn_settings.truncate(kept);
                    for (_, a) in self.txn_applied.iter_mut() {
                        *a = (*a).min(kept);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{SavepointOp, savepoint_op};

    #[test]
    fn savepoint_commands_are_recognised() {
        assert_eq!(
            savepoint_op("SAVEPOINT a"),
            Some(SavepointOp::Set("a".into()))
        );
        assert_eq!(
            savepoint_op("savepoint \"My Sp\";"),
            Some(SavepointOp::Set("My Sp".into()))
        );
        assert_eq!(
            savepoint_op("RELEASE SAVEPOINT B"),
            Some(SavepointOp::Release("b".into()))
        );
        assert_eq!(
            savepoint_op("release b"),
            Some(SavepointOp::Release("b".into()))
        );
        assert_eq!(
            savepoint_op("ROLLBACK TO SAVEPOINT a"),
            Some(SavepointOp::RollbackTo("a".into()))
        );
        assert_eq!(
            savepoint_op("rollback work to a"),
            Some(SavepointOp::RollbackTo("a".into()))
        );
        assert_eq!(savepoint_op("ROLLBACK"), None);
        assert_eq!(savepoint_op("ROLLBACK PREPARED 'x'"), None);
        assert_eq!(savepoint_op("SAVEPOINT a; SELECT 1"), None);
        assert_eq!(
            savepoint_op("ROLLBACK TO SAVEPOINT s /* retry */ -- x"),
            Some(SavepointOp::RollbackTo("s".into()))
        );
        assert_eq!(
            savepoint_op("ROLLBACK TO savepoint"),
            Some(SavepointOp::RollbackTo("savepoint".into()))
        );
        assert_eq!(
            savepoint_op("SAVEPOINT Äb"),
            Some(SavepointOp::Set("Äb".into()))
        );
        assert_eq!(savepoint_op("SAVEPOINT 1a"), None);
        assert_eq!(
            savepoint_op(&format!("SAVEPOINT {}", "x".repeat(70))),
            Some(SavepointOp::Set("x".repeat(63)))
        );
        assert!(super::is_savepoint_command("rollback to s; select 1"));
        assert!(super::is_savepoint_command("release x"));
        assert!(!super::is_savepoint_command("ROLLBACK"));
        assert!(!super::is_savepoint_command("ROLLBACK PREPARED 'x'"));

        assert_eq!(
            SavepointOp::RollbackTo("x\"y".into()).sql(),
            "ROLLBACK TO SAVEPOINT \"x\"\"y\""
        );
    }
}
