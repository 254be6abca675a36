//! Session settings under transaction pooling. A client's settings are its startup
//! parameters plus the session-level SET statements it ran. Every backend connection
//! remembers the fingerprint of the settings applied on it; when a session borrows one
//! with other settings, the router first runs `RESET ALL` and replays the session's
//! settings (one extra statement, sent in the same round trip as the client's).

use crate::error::RouterError;
use crate::protocol::ProtocolError;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// A connection's `settings_fp` when its settings are unknown (a transaction's SETs
/// may be on it): never a session's fingerprint (those are 0 or odd), so the next
/// session re-applies its own.
pub const DIRTY_FP: u64 = 2;

#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// From the startup packet (and `options=-c name=value`): name -> value.
    startup: BTreeMap<String, String>,
    /// Session-level SET statements, by lowercased parameter name: the text to replay.
    sets: BTreeMap<String, String>,
    fp: u64,
}

/// A statement that changes session state the router tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionStmt {
    Set {
        name: String,
        stmt: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    DiscardAll,
    /// `DEALLOCATE name` (or `DEALLOCATE PREPARE name`).
    Deallocate {
        name: String,
    },
    DeallocateAll,
}

impl SessionStmt {
    /// The command tag Postgres answers this statement with.
    pub fn tag(&self) -> &'static [u8] {
        match self {
            SessionStmt::Set { .. } => b"SET",
            SessionStmt::Reset { .. } | SessionStmt::ResetAll => b"RESET",
            SessionStmt::DiscardAll => b"DISCARD ALL",
            SessionStmt::Deallocate { .. } => b"DEALLOCATE",
            SessionStmt::DeallocateAll => b"DEALLOCATE ALL",
        }
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

impl Settings {
    pub fn from_startup(params: &[(String, String)]) -> Result<Settings, RouterError> {
        let mut s = Settings::default();
        for (k, v) in params {
            if NOT_SETTINGS.contains(&k.as_str()) || k.starts_with("_pq_.") {
                continue;
            }
            s.add_startup(k, v)?;
        }
        if let Some((_, opts)) = params.iter().find(|(k, _)| k == "options") {
            for (k, v) in parse_options(opts)? {
                s.add_startup(&k, &v)?;
            }
        }
        s.refresh();
        Ok(s)
    }

    fn add_startup(&mut self, k: &str, v: &str) -> Result<(), RouterError> {
        if !valid_name(k) {
            return Err(RouterError::Protocol(ProtocolError::Malformed(
                "invalid parameter name in startup packet",
            )));
        }
        self.startup.insert(k.to_ascii_lowercase(), v.to_owned());
        Ok(())
    }

    /// 0 means "no settings": what a fresh backend connection has.
    pub fn fingerprint(&self) -> u64 {
        self.fp
    }

    fn refresh(&mut self) {
        self.fp = if self.startup.is_empty() && self.sets.is_empty() {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.startup.hash(&mut h);
            self.sets.hash(&mut h);
            h.finish() | 1
        };
    }

    /// The statement that puts a backend connection into this session's state.
    pub fn apply_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for (k, v) in &self.startup {
            sql.push_str("; SET ");
            sql.push_str(k);
            sql.push_str(" TO ");
            sql.push_str(&dollar_quote(v));
        }
        for stmt in self.sets.values() {
            sql.push_str("; ");
            sql.push_str(stmt);
        }
        sql
    }

    /// The same for the router's own control connections (admin functions), which
    /// must stay in UTF-8 whatever the client uses.
    pub fn control_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for (k, v) in &self.startup {
            if k.eq_ignore_ascii_case("client_encoding") {
                continue;
            }
            sql.push_str("; SET ");
            sql.push_str(k);
            sql.push_str(" TO ");
            sql.push_str(&dollar_quote(v));
        }
        for stmt in self.sets.values() {
            if stmt.to_ascii_lowercase().contains("client_encoding") {
                continue;
            }
            sql.push_str("; ");
            sql.push_str(stmt);
        }
        sql
    }

    /// Records a tracked statement that succeeded (outside a transaction, or in one
    /// that committed).
    pub fn record(&mut self, stmt: &SessionStmt) {
        match stmt {
            SessionStmt::Set { name, stmt } => {
                self.sets.insert(name.clone(), stmt.clone());
            }
            SessionStmt::Reset { name } => {
                self.sets.remove(name);
            }
            SessionStmt::ResetAll | SessionStmt::DiscardAll => self.sets.clear(),
            SessionStmt::Deallocate { .. } | SessionStmt::DeallocateAll => {}
        }
        self.refresh();
    }
}

fn dollar_quote(v: &str) -> String {
    let mut tag = String::from("$sg$");
    let mut i = 0;
    while v.contains(&tag) {
        i += 1;
        tag = format!("$sg{i}$");
    }
    format!("{tag}{v}{tag}")
}

/// `options` of the startup packet: `-c name=value` and `--name=value`, separated by
/// spaces (a backslash escapes the next character), as libpq's PGOPTIONS.
fn parse_options(opts: &str) -> Result<Vec<(String, String)>, RouterError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = opts.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n)
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur))
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let bad = || {
        RouterError::Protocol(ProtocolError::Malformed(
            "invalid options in startup packet",
        ))
    };
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next().ok_or_else(bad)?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(bad());
        };
        let (k, v) = kv.split_once('=').ok_or_else(bad)?;
        out.push((k.replace('-', "_"), v.to_owned()));
    }
    Ok(out)
}

/// Recognizes the single statements whose effect outlives a transaction and that the
/// router must track. Anything else (including several statements in one Query) is
/// `None` and passes through untracked.
pub fn classify(sql: &str) -> Option<SessionStmt> {
    // Fast exit for the common case (no allocation): only SET, RESET, DISCARD and
    // DEALLOCATE are tracked.
    let first = sql.trim_start().as_bytes().first()?.to_ascii_lowercase();
    if !matches!(first, b's' | b'r' | b'd') {
        return None;
    }
    let s = sql.trim().trim_end_matches(';').trim();
    if s.is_empty() || s.contains(';') || s.contains("--") || s.contains("/*") {
        return None;
    }
    let lower = s.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    match words.as_slice() {
        ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => None,
        ["set", "session", "characteristics", ..] => None,
        ["set", "session", "authorization", ..] => None,
        ["set", "session", name, ..] | ["set", name, ..] => {
            let name = set_name(name, &words)?;
            Some(SessionStmt::Set {
                name,
                stmt: s.to_owned(),
            })
        }
        ["reset", "all"] => Some(SessionStmt::ResetAll),
        ["reset", "session", "authorization"] => None,
        ["reset", name] => Some(SessionStmt::Reset {
            name: canonical(name),
        }),
        ["discard", "all"] => Some(SessionStmt::DiscardAll),
        ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            Some(SessionStmt::DeallocateAll)
        }
        ["deallocate", "prepare", _] | ["deallocate", _] => {
            // Statement names keep their case: take the original text's last word.
            let name = s.split_whitespace().last()?.trim_matches('"').to_owned();
            Some(SessionStmt::Deallocate { name })
        }
        _ => None,
    }
}

fn set_name(first: &str, words: &[&str]) -> Option<String> {
    // `SET TIME ZONE x` and `SET SCHEMA x` are spellings of timezone and search_path.
    if first == "time" && words.contains(&"zone") {
        return Some("timezone".into());
    }
    if first == "schema" {
        return Some("search_path".into());
    }
    if first == "names" {
        return Some("client_encoding".into());
    }
    let name = first.split(['=', ' ']).next()?;
    let name = canonical(name);
    valid_name(&name).then_some(name)
}

fn canonical(name: &str) -> String {
    let n = name.trim_matches('"').to_ascii_lowercase();
    match n.as_str() {
        "time" => "timezone".into(),
        _ => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_statements() {
        assert_eq!(
            classify("SET search_path TO app, public;"),
            Some(SessionStmt::Set {
                name: "search_path".into(),
                stmt: "SET search_path TO app, public".into()
            })
        );
        assert!(
            matches!(classify("set statement_timeout=5"), Some(SessionStmt::Set { name, .. }) if name == "statement_timeout")
        );
        assert!(
            matches!(classify("SET TIME ZONE 'UTC'"), Some(SessionStmt::Set { name, .. }) if name == "timezone")
        );
        assert_eq!(classify("SET LOCAL work_mem = '1MB'"), None);
        assert_eq!(
            classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            None
        );
        assert_eq!(classify("set a.b = 1; select 1"), None);
        assert_eq!(classify("RESET ALL"), Some(SessionStmt::ResetAll));
        assert_eq!(
            classify("reset DateStyle"),
            Some(SessionStmt::Reset {
                name: "datestyle".into()
            })
        );
        assert_eq!(classify("DISCARD ALL"), Some(SessionStmt::DiscardAll));
        assert_eq!(
            classify("DEALLOCATE \"Stmt1\""),
            Some(SessionStmt::Deallocate {
                name: "Stmt1".into()
            })
        );
        assert_eq!(classify("select 1"), None);
    }

    #[test]
    fn settings_fingerprint_and_sql() {
        let params = vec![
            ("user".to_string(), "u".to_string()),
            ("application_name".to_string(), "it's $sg$".to_string()),
            (
                "options".to_string(),
                "-c search_path=a\\ b --work-mem=4MB".to_string(),
            ),
        ];
        let mut s = Settings::from_startup(&params).unwrap();
        let fp0 = s.fingerprint();
        assert_ne!(fp0, 0);
        let sql = s.apply_sql();
        assert!(sql.starts_with("RESET ALL; SET application_name TO $sg1$it's $sg$$sg1$"));
        assert!(sql.contains("SET search_path TO $sg$a b$sg$"));
        assert!(sql.contains("SET work_mem TO $sg$4MB$sg$"));
        s.record(&classify("set statement_timeout = 1000").unwrap());
        assert_ne!(s.fingerprint(), fp0);
        s.record(&SessionStmt::ResetAll);
        assert_eq!(s.fingerprint(), fp0);
        assert_eq!(Settings::from_startup(&[]).unwrap().fingerprint(), 0);
        let bad = vec![("x; drop table t".to_string(), "1".to_string())];
        assert!(Settings::from_startup(&bad).is_err());
    }
}
