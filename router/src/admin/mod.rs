//! Admin SQL functions (Citus's names and arguments) and DDL on distributed and
//! reference tables, intercepted from the client's simple queries and carried out by
//! the router over control connections: the catalog change and the work on the
//! workers commit together or not at all (see `fleet`).
//!
//! Protocol: `classify` decides, from the statement text and the catalog snapshot,
//! whether a query is the router's to run; `execute` runs it and returns rows to send.

mod call;
pub(crate) mod data;
mod ddl;
mod distribute;
mod error;
mod fleet;
mod nodes;
mod privileges;
mod recover;
mod shape;

pub use call::{Func, may_be_call};

/// The parameter types of an admin call's `$n` placeholders.
pub fn placeholder_types(sql: &str) -> Vec<u32> {
    call::parse_sql(sql)
        .map(|s| call::placeholder_types(&s))
        .unwrap_or_default()
}
pub use ddl::may_be_ddl;
pub use error::AdminError;
pub use recover::{Recovered, recover};

use crate::backend::control::{ControlLogin, connect_node};
use crate::catalog::{CATALOG_LOCK, CHANNEL, Snapshot};
use crate::server::ServerCtx;
use std::sync::Arc;
use tokio_postgres::Client;

/// What the router runs itself instead of forwarding.
#[derive(Debug)]
pub enum Request {
    Call(call::Call),
    Ddl(Box<ddl::Ddl>),
}

impl Request {
    /// The result columns (name, type oid), known before running.
    pub fn columns(&self) -> Vec<(String, u32)> {
        match self {
            Request::Call(c) => match c.func {
                Func::AddNode => vec![(c.column.clone(), 23)],
                Func::GetShardId => vec![(c.column.clone(), 20)],
                Func::RecoverPrepared => vec![(c.column.clone(), 23)],
                Func::ReloadPlugins => ["plugin", "kind", "result", "detail"]
                    .iter()
                    .map(|n| (n.to_string(), 25))
                    .collect(),
                _ => vec![(c.column.clone(), VOID_OID)],
            },
            Request::Ddl(_) => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Request::Call(c) => c.name.to_owned(),
            Request::Ddl(d) => d.tag().to_owned(),
        }
    }
}

/// Puts the guard trigger on a distributed table's coordinator table.
pub(crate) async fn guard(c: &Client, qualified_table: &str) -> Result<(), AdminError> {
    c.batch_execute(&format!(
        "CREATE TRIGGER shardgate_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {qualified_table}
         FOR EACH STATEMENT EXECUTE FUNCTION shardgate.guard_shell()"
    ))
    .await
    .map_err(|e| AdminError::on("coordinator", e))
}

/// Rows (text) and a command tag for the client.
#[derive(Debug, Default)]
pub struct Reply {
    /// Column name and type oid.
    pub columns: Vec<(String, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
    pub notices: Vec<String>,
}

pub(crate) const VOID_OID: u32 = 2278;

impl Reply {
    fn void(column: &str) -> Reply {
        Reply {
            columns: vec![(column.to_owned(), VOID_OID)],
            rows: vec![vec![Some(String::new())]],
            tag: "SELECT 1".into(),
            notices: Vec::new(),
        }
    }

    fn value(column: &str, oid: u32, v: String) -> Reply {
        Reply {
            columns: vec![(column.to_owned(), oid)],
            rows: vec![vec![Some(v)]],
            tag: "SELECT 1".into(),
            notices: Vec::new(),
        }
    }
}

/// Decides whether the router runs `sql` itself. `Ok(None)`: forward it. A statement
/// that does not parse is forwarded (Postgres reports the syntax error).
pub fn classify(snap: &Snapshot, sql: &str) -> Result<Option<Request>, AdminError> {
    classify_with(snap, sql, &[])
}

/// `classify` with the values of `$n` parameters (extended protocol), as text.
pub fn classify_with(
    snap: &Snapshot,
    sql: &str,
    params: &[Option<String>],
) -> Result<Option<Request>, AdminError> {
    let call_like = call::may_be_call(sql);
    let ddl_like = !snap.names.is_empty() && ddl::may_be_ddl(sql);
    if !call_like && !ddl_like {
        return Ok(None);
    }
    let Ok(stmts) = call::parse_sql(sql) else {
        return Ok(None);
    };
    if call_like && let Some(c) = call::parse(&stmts, params)? {
        return Ok(Some(Request::Call(c)));
    }
    if ddl_like {
        return Ok(ddl::classify(snap, stmts, sql)?.map(|d| Request::Ddl(Box::new(d))));
    }
    Ok(None)
}

/// Who asks, and where.
pub struct AdminCtx<'a> {
    pub server: &'a Arc<ServerCtx>,
    /// The session's credentials towards the nodes: admin work runs with the client's
    /// own rights.
    pub login: ControlLogin,
    pub database: String,
    /// The session's settings (search_path...), applied to the coordinator connection
    /// so that names resolve as they would for the client.
    pub settings_sql: String,
}

impl AdminCtx<'_> {
    pub async fn execute(&self, req: Request) -> Result<Reply, AdminError> {
        let catalog = &self.server.catalog;
        if self.database != catalog.database {
            return Err(AdminError::Prerequisite {
                message: format!(
                    "distributed tables live in database \"{}\"; this session is connected to \"{}\"",
                    catalog.database, self.database
                ),
                hint: Some(format!("connect to database \"{}\"", catalog.database)),
            });
        }
        match req {
            Request::Call(c) => match c.func {
                Func::AddNode => nodes::add_node(self, &c).await,
                Func::RemoveNode => nodes::remove_node(self, &c).await,
                Func::SetCoordinatorHost => nodes::set_coordinator_host(self, &c).await,
                Func::CreateDistributedTable => {
                    distribute::create_distributed_table(self, &c).await
                }
                Func::CreateReferenceTable => distribute::create_reference_table(self, &c).await,
                Func::UndistributeTable => distribute::undistribute_table(self, &c).await,
                Func::GetShardId => distribute::get_shard_id(self, &c).await,
                Func::ReloadPlugins => self.reload_plugins(&c).await,
                Func::RecoverPrepared => self.recover_prepared(&c).await,
            },
            Request::Ddl(d) => ddl::run(self, *d).await,
        }
    }

    fn login_ref(&self) -> &ControlLogin {
        &self.login
    }

    /// A connection to the coordinator with the session's settings.
    async fn coordinator(&self) -> Result<Client, AdminError> {
        let node = &self.server.config.coordinator;
        let c = connect_node(&self.login, &node.host, node.port, &self.database)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(_) => AdminError::on(&node.name, e),
                None => AdminError::Connect {
                    node: "the coordinator".into(),
                    reason: e.to_string(),
                },
            })?;
        if !self.settings_sql.is_empty() {
            // Then row_security off again (`connect_node`): the settings start with a
            // RESET ALL.
            c.batch_execute(&format!("{};\nSET row_security = off", self.settings_sql))
                .await
                .map_err(|e| AdminError::on("coordinator", e))?;
        }
        Ok(c)
    }

    /// A coordinator transaction holding the catalog lock, and the catalog as of now.
    async fn begin(&self) -> Result<(Client, Snapshot), AdminError> {
        let c = self.coordinator().await?;
        let on = |e| AdminError::on("coordinator", e);
        c.batch_execute("BEGIN").await.map_err(on)?;
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&CATALOG_LOCK])
            .await
            .map_err(on)?;
        // The guard on distributed tables' coordinator tables lets admin work through.
        c.batch_execute("SET LOCAL shardgate.admin = on")
            .await
            .map_err(on)?;
        let snap = Snapshot::read(&c).await.map_err(on)?;
        Ok((c, snap))
    }

    /// Bumps the catalog version and notifies the other routers (in the transaction).
    async fn bump(&self, c: &Client) -> Result<(), AdminError> {
        c.batch_execute(&format!(
            "UPDATE shardgate.catalog_state SET version = version + 1;
             SELECT pg_notify('{CHANNEL}', version::text) FROM shardgate.catalog_state"
        ))
        .await
        .map_err(|e| AdminError::on("coordinator", e))
    }

    /// Commits a change: workers prepare, the coordinator records them and commits (the
    /// commit point), this router's snapshot is refreshed, the workers commit.
    async fn commit(&self, coord: Client, fleet: Option<fleet::Fleet>) -> Result<(), AdminError> {
        let on = |e| AdminError::on("coordinator", e);
        let mut fleet = fleet;
        if let Some(f) = &mut fleet
            && let Err(e) = f.prepare().await
        {
            let _ = coord.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        let prepared = fleet.as_ref().map(|f| f.prepared()).unwrap_or_default();
        for (group, gid) in &prepared {
            if let Err(e) = coord
                .execute(
                    "INSERT INTO shardgate.pg_dist_transaction (groupid, gid) VALUES ($1, $2)",
                    &[group, gid],
                )
                .await
            {
                self.abort(coord, fleet).await;
                return Err(on(e));
            }
        }
        let mut broken = false;
        match coord.batch_execute("COMMIT").await {
            Ok(()) => {}
            // The coordinator said no: nothing committed.
            Err(e) if e.as_db_error().is_some() => {
                if let Some(f) = fleet {
                    f.rollback().await;
                }
                return Err(on(e));
            }
            // The connection broke: the commit may or may not have happened. The
            // commit records say which.
            Err(e) => {
                let Some((_, gid)) = prepared.first() else {
                    return Err(AdminError::Connect {
                        node: "the coordinator".into(),
                        reason: format!("{e}; the change may or may not have been applied"),
                    });
                };
                let committed = match self.coordinator().await {
                    Ok(c) => c
                        .query_opt(
                            "SELECT 1 FROM shardgate.pg_dist_transaction WHERE gid = $1",
                            &[gid],
                        )
                        .await
                        .map(|r| r.is_some())
                        .ok(),
                    Err(_) => None,
                };
                broken = true;
                match committed {
                    Some(false) => {
                        if let Some(f) = fleet {
                            f.rollback().await;
                        }
                        return Err(on(e));
                    }
                    Some(true) => {}
                    None => {
                        return Err(AdminError::InDoubt {
                            node: "the coordinator".into(),
                            reason: format!(
                                "{e}; the workers' transactions stay prepared until recovery decides from shardgate.pg_dist_transaction"
                            ),
                        });
                    }
                }
            }
        }
        // Committed: this router sees its own change from now on.
        let c = if broken {
            self.coordinator().await.ok()
        } else {
            Some(coord)
        };
        if let Some(c) = &c
            && let Ok(snap) = Snapshot::load(c).await
        {
            self.server.catalog.install(snap);
        }
        let Some(f) = fleet else { return Ok(()) };
        let (done, err) = f.commit().await;
        if let Some(c) = &c
            && !done.is_empty()
        {
            let _ = c
                .execute(
                    "DELETE FROM shardgate.pg_dist_transaction WHERE gid = ANY($1)",
                    &[&done],
                )
                .await;
        }
        err.map_or(Ok(()), Err)
    }

    async fn abort(&self, coord: Client, fleet: Option<fleet::Fleet>) {
        if let Some(f) = fleet {
            f.rollback().await;
        }
        let _ = coord.batch_execute("ROLLBACK").await;
    }

    /// One recovery pass now (admin changes and this router's distributed
    /// transactions): how many prepared transactions it finished.
    async fn recover_prepared(&self, c: &call::Call) -> Result<Reply, AdminError> {
        let catalog = &self.server.catalog;
        let admin = recover(
            catalog.login(),
            &catalog.database,
            std::time::Duration::ZERO,
        )
        .await?;
        let txns = &self.server.txns;
        txns.claim_router_id()
            .await
            .map_err(|e| AdminError::Prerequisite {
                message: e.to_string(),
                hint: None,
            })?;
        let user =
            txns.recover(&catalog.snapshot())
                .await
                .map_err(|reason| AdminError::Connect {
                    node: "a node".into(),
                    reason,
                })?;
        let n = admin.committed + admin.rolled_back + user.committed + user.rolled_back;
        Ok(Reply {
            columns: vec![(c.column.clone(), 23)],
            rows: vec![vec![Some(n.to_string())]],
            tag: "SELECT 1".into(),
            ..Reply::default()
        })
    }

    async fn reload_plugins(&self, _c: &call::Call) -> Result<Reply, AdminError> {
        let in_use = self.server.catalog.snapshot().plugins_in_use();
        let report = self.server.plugins.reload(&in_use).await;
        let mut reply = Reply {
            columns: vec![
                ("plugin".into(), 25),
                ("kind".into(), 25),
                ("result".into(), 25),
                ("detail".into(), 25),
            ],
            ..Reply::default()
        };
        for line in report.lines() {
            reply.rows.push(vec![
                Some(line.plugin.clone()),
                Some(line.kind.clone()),
                Some(line.result.clone()),
                line.detail.clone(),
            ]);
        }
        reply.tag = format!("SELECT {}", reply.rows.len());
        Ok(reply)
    }
}

/// Runs a change: `f` works inside the coordinator transaction (and usually opens a
/// fleet); on error everything is rolled back.
macro_rules! in_change {
    ($actx:expr, $coord:ident, $fleet:ident, $body:block) => {{
        let mut $fleet: Option<$crate::admin::fleet::Fleet> = None;
        let r: Result<_, AdminError> = async {
            let v: Result<_, AdminError> = async { $body }.await;
            let v = v?;
            $actx.bump(&$coord).await?;
            Ok(v)
        }
        .await;
        match r {
            Ok(v) => {
                $actx.commit($coord, $fleet).await?;
                Ok(v)
            }
            Err(e) => {
                $actx.abort($coord, $fleet).await;
                Err(e)
            }
        }
    }};
}
pub(crate) use in_change;

/// The first distributed or reference table a statement names, if any: such
/// statements are not routed to shards yet, and running them on the coordinator's
/// empty shell would give wrong answers, so they are refused. Identifiers are found
/// with a small lexer (string literals, quoted identifiers, comments and dollar quotes
/// skipped); a column that happens to share a distributed table's name is refused too
/// (a false refusal, never a wrong answer).
/// Views over distributed tables count (on the coordinator they read the empty
/// shells), except in DDL (CREATE / ALTER / DROP of the views themselves).
pub fn touches_distributed<'s>(snap: &'s Snapshot, sql: &str) -> Option<&'s str> {
    if snap.names.is_empty() {
        return None;
    }
    let views = !snap.views.is_empty() && !ddl::may_be_ddl(sql);
    find_name(sql, |ident| {
        snap.names
            .get_key_value(ident)
            .map(|(k, _)| k.as_str())
            .or_else(|| {
                views
                    .then(|| snap.views.get(ident).map(String::as_str))
                    .flatten()
            })
    })
}

/// A view over distributed tables that `sql` names, if any.
pub fn names_view<'s>(snap: &'s Snapshot, sql: &str) -> Option<&'s str> {
    if snap.views.is_empty() {
        return None;
    }
    find_name(sql, |ident| snap.views.get(ident).map(String::as_str))
}

/// The first identifier of `sql` (outside literals and comments; folded to lower case
/// unless quoted) that `found` knows.
fn find_name<'s>(sql: &str, found: impl Fn(&str) -> Option<&'s str>) -> Option<&'s str> {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => {
                // E'...' strings take backslash escapes.
                let escapes = i > 0
                    && matches!(b[i - 1], b'e' | b'E')
                    && (i < 2 || !(b[i - 2].is_ascii_alphanumeric() || b[i - 2] == b'_'));
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                let ident = sql[start..i.min(b.len())].replace("\"\"", "\"");
                if let Some(t) = found(&ident) {
                    return Some(t);
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                // $tag$ ... $tag$ (or $1, a parameter)
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if i < b.len() && b[i] == b'$' && !b[start + 1..i].iter().any(u8::is_ascii_digit) {
                    let tag = &sql[start..=i];
                    i += 1;
                    match sql[i..].find(tag) {
                        Some(end) => i += end + tag.len(),
                        None => i = b.len(),
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                let word = &sql[start..i];
                let lower;
                let word = if word.bytes().any(|c| c.is_ascii_uppercase()) {
                    lower = word.to_ascii_lowercase();
                    lower.as_str()
                } else {
                    word
                };
                if let Some(t) = found(word) {
                    return Some(t);
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_distributed_tables_by_token() {
        let mut snap = Snapshot::default();
        snap.names.insert("orders".into(), vec![1]);
        snap.names.insert("Mixed".into(), vec![2]);
        assert_eq!(
            touches_distributed(&snap, "SELECT * FROM orders WHERE id = 1"),
            Some("orders")
        );
        assert_eq!(
            touches_distributed(&snap, "select * from public.ORDERS"),
            Some("orders")
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT * FROM \"Mixed\""),
            Some("Mixed")
        );
        assert_eq!(touches_distributed(&snap, "SELECT * FROM mixed"), None);
        assert_eq!(
            touches_distributed(&snap, "SELECT 'orders', $x$ orders $x$ -- orders"),
            None
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT * FROM orders_archive /* orders */"),
            None
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT $1::int FROM orders"),
            Some("orders")
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT 'it''s' || x FROM t"),
            None
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT E'\\'' AS q, count(*) FROM orders"),
            Some("orders")
        );
        assert_eq!(
            touches_distributed(&snap, "SELECT e'\\\\' FROM orders"),
            Some("orders")
        );
    }
}
