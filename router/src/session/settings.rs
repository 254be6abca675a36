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

/// What puts a backend connection back to its defaults before a session's settings
/// are replayed. `RESET ALL` leaves the role and the session user alone (Postgres
/// exempts them), so a `SET ROLE` of one client would outlive it: they are reset too.
pub const RESET_SQL: &str = "RESET ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE";

/// Owners of [`Settings`], for [`Settings::untracked_fingerprint`].
static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// From the startup packet (and `options=-c name=value`): name -> value.
    startup: BTreeMap<String, String>,
    /// Session-level SET statements, by lowercased parameter name: the text to replay.
    sets: BTreeMap<String, String>,
    fp: u64,
    /// Which session these are (unique in the process).
    owner: u64,
}

/// A statement that changes session state the router tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionStmt {
    Set {
        name: String,
        stmt: String,
    },
    /// `SELECT set_config('name', 'value', false)` alone: a SET by another name
    /// (answered `SELECT 1`), replayed as `stmt` (a `set_config` call too: for a list
    /// setting such as `search_path`, `SET name TO 'a, b'` would mean one element).
    SetConfig {
        name: String,
        stmt: String,
    },
    /// `SET LOCAL name ...`: it ends with the transaction (never recorded), but every
    /// node of the transaction must have it (replayed on nodes that join later).
    SetLocal {
        name: String,
        stmt: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    DiscardAll,
    /// The SET / RESET / DISCARD ALL statements of a string of several statements, in
    /// order: recorded only when the whole string succeeded (an error rolls back the
    /// string's implicit transaction, and its SETs with it).
    Many(Vec<SessionStmt>),
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
            // `set_config(name, value, true)` (replayed as such) answers a row.
            SessionStmt::SetLocal { stmt, .. } if stmt.starts_with("SELECT ") => b"SELECT 1",
            SessionStmt::SetLocal { .. } => b"SET",
            SessionStmt::SetConfig { .. } => b"SELECT 1",
            SessionStmt::Reset { .. } | SessionStmt::ResetAll => b"RESET",
            SessionStmt::DiscardAll => b"DISCARD ALL",
            SessionStmt::Deallocate { .. } => b"DEALLOCATE",
            SessionStmt::DeallocateAll => b"DEALLOCATE ALL",
            // Matched by any CommandComplete of the string (see the session).
            SessionStmt::Many(_) => b"",
        }
    }

    /// Whether it only lasts for the transaction it ran in.
    pub fn is_local(&self) -> bool {
        match self {
            SessionStmt::SetLocal { .. } => true,
            SessionStmt::Many(all) => all.iter().all(SessionStmt::is_local),
            _ => false,
        }
    }

    /// The SQL that gives another node of the same transaction the same setting, as
    /// the client ran it (prepared statements are not settings: `None`). RESET ALL
    /// needs the session's startup parameters after it, and a `Many` is split by the
    /// session: both are the session's to replay (`route::replay_of`).
    pub fn replay_sql(&self) -> Option<String> {
        match self {
            SessionStmt::Set { stmt, .. }
            | SessionStmt::SetConfig { stmt, .. }
            | SessionStmt::SetLocal { stmt, .. } => Some(stmt.clone()),
            SessionStmt::Reset { name } => Some(format!("RESET {name}")),
            SessionStmt::ResetAll
            | SessionStmt::Many(_)
            | SessionStmt::DiscardAll
            | SessionStmt::Deallocate { .. }
            | SessionStmt::DeallocateAll => None,
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
        let mut s = Settings {
            owner: NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Settings::default()
        };
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

    /// The fingerprint of a connection that has this session's settings plus
    /// changes the router did not follow (see [`Inspected::untracked`]): the session
    /// itself goes on using it as it is, any other session resets it first. Never 0,
    /// [`DIRTY_FP`] or a session's fingerprint (those are odd): it is 4 modulo 8.
    pub fn untracked_fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.owner, self.fp).hash(&mut h);
        (h.finish() << 3) | 4
    }

    /// Whether a connection with fingerprint `conn_fp` already has these settings.
    pub fn applied(&self, conn_fp: u64) -> bool {
        conn_fp == self.fp || conn_fp == self.untracked_fingerprint()
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
        let replay = self.replay_sql();
        if replay.is_empty() {
            RESET_SQL.to_owned()
        } else {
            format!("{RESET_SQL}; {replay}")
        }
    }

    /// The session's settings as SET statements, for a connection just reset:
    /// startup parameters, then SETs, a `SET ROLE` last (the others may need the
    /// login role's privileges, as they had when the client ran them).
    pub fn replay_sql(&self) -> String {
        self.statements(false)
    }

    /// The same for the router's own control connections (admin functions), which
    /// must stay in UTF-8 whatever the client uses.
    pub fn control_sql(&self) -> String {
        let replay = self.statements(true);
        if replay.is_empty() {
            RESET_SQL.to_owned()
        } else {
            format!("{RESET_SQL}; {replay}")
        }
    }

    /// The session's startup parameters as SET statements: what a client's RESET ALL
    /// brings back (on a backend the router SET them on, RESET ALL drops them).
    pub fn startup_sql(&self) -> String {
        let mut sql = String::new();
        for (k, v) in &self.startup {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&format!("SET {k} TO {}", dollar_quote(v)));
        }
        sql
    }

    fn statements(&self, keep_encoding: bool) -> String {
        let mut sql = String::new();
        let mut push = |s: &str| {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(s);
        };
        for (k, v) in &self.startup {
            if !(keep_encoding && k == "client_encoding") {
                push(&format!("SET {k} TO {}", dollar_quote(v)));
            }
        }
        for (k, stmt) in &self.sets {
            if k != "role" && !(keep_encoding && k == "client_encoding") {
                push(stmt);
            }
        }
        if let Some(role) = self.sets.get("role") {
            push(role);
        }
        sql
    }

    /// Whether the session has startup parameters: a client's `RESET ALL` brings
    /// those back in Postgres, but on a backend where the router SET them it resets
    /// them to the server's defaults (the connection must be replayed).
    pub fn has_startup(&self) -> bool {
        !self.startup.is_empty()
    }

    /// Records a tracked statement that succeeded (outside a transaction, or in one
    /// that committed).
    pub fn record(&mut self, stmt: &SessionStmt) {
        match stmt {
            SessionStmt::Set { name, stmt } | SessionStmt::SetConfig { name, stmt } => {
                self.sets.insert(name.clone(), stmt.clone());
            }
            SessionStmt::Reset { name } => {
                self.sets.remove(name);
            }
            // Postgres's RESET ALL leaves the role; DISCARD ALL resets it too.
            SessionStmt::ResetAll => self.sets.retain(|name, _| name == "role"),
            SessionStmt::DiscardAll => self.sets.clear(),
            SessionStmt::SetLocal { .. }
            | SessionStmt::Deallocate { .. }
            | SessionStmt::DeallocateAll => {}
            SessionStmt::Many(all) => {
                for t in all {
                    self.record(t);
                }
            }
        }
        self.refresh();
    }
}

/// `v` as a dollar-quoted literal: with a tag whose first occurrence after the opening
/// one is the closing one (a value ending in `$sg` must not close it early).
fn dollar_quote(v: &str) -> String {
    let mut tag = String::from("$sg$");
    let mut i = 0;
    while format!("{v}{tag}").find(&tag) != Some(v.len()) {
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

/// What a simple Query string does to the session state the router follows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    /// The statements to record when the string succeeds: one statement
    /// ([`classify`]), or the SET / RESET / DISCARD ALL statements of a string of
    /// several ([`SessionStmt::Many`]).
    pub tracked: Option<SessionStmt>,
    /// The string may leave session settings behind that the router does not follow:
    /// `set_config(...)`, a SET behind a comment or of a kind not tracked (`SET SESSION
    /// AUTHORIZATION`, `SET SESSION CHARACTERISTICS`), a string of several statements
    /// with transaction control and SETs. The backend connection is then marked so
    /// that no other session takes it without resetting it first.
    pub untracked: bool,
}

/// Looks at a simple Query string (or the text of an extended-protocol statement).
/// Cheap for the statements of OLTP traffic: a byte scan, and the lexer only for
/// strings that have both a `;` and "set" / "dis" in them.
pub fn inspect(sql: &str) -> Inspected {
    if let Some(t) = classify(sql) {
        return Inspected {
            tracked: Some(t),
            untracked: false,
        };
    }
    let b = sql.as_bytes();
    let mut untracked = calls_set_config(b);
    if untracked
        && let Some(calls) = set_config_calls(sql)
        && let Some(all) = calls
            .iter()
            .map(|c| match (&c.name, &c.value) {
                (ConfigValue::Text(n), ConfigValue::Text(v)) => c.tracked(n, v),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
    {
        return Inspected {
            tracked: set_config_tracked(all),
            untracked: false,
        };
    }
    if memchr::memchr(b';', b).is_none() {
        // One statement: what follows its leading comments (sqlcommenter-style
        // comments, and SETs behind them, are tracked as any other).
        let head = skip_comments(sql);
        if head.len() != sql.trim_start().len()
            && let Some(t) = classify(head)
        {
            return Inspected {
                tracked: Some(t),
                untracked,
            };
        }
        untracked |= changes_settings(head);
        return Inspected {
            tracked: None,
            untracked,
        };
    }
    if !b
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"set") || w.eq_ignore_ascii_case(b"dis"))
    {
        return Inspected {
            tracked: None,
            untracked,
        };
    }
    let mut all = Vec::new();
    let mut control = false;
    let mut n = 0;
    let mut untracked_set = false;
    // Each statement from its first word (the lexer's: comments are spaces to it).
    let mut take = |stmt: &str| {
        // A string that opens a transaction and only then changes settings
        // (`BEGIN; SET LOCAL ...`) is tracked: its SETs belong to the new transaction.
        match super::route::control(stmt) {
            Some(super::route::Control::Begin) if n == 0 => {}
            Some(_) => control = true,
            None => {}
        }
        n += 1;
        match classify(stmt) {
            Some(
                t @ (SessionStmt::Set { .. }
                | SessionStmt::SetLocal { .. }
                | SessionStmt::Reset { .. }
                | SessionStmt::ResetAll
                | SessionStmt::DiscardAll),
            ) => all.push(t),
            // `SET SESSION CHARACTERISTICS`: its SETs.
            Some(SessionStmt::Many(m)) => all.extend(m),
            Some(_) => {}
            None => untracked_set |= changes_settings(stmt),
        }
    };
    for stmt in crate::plan::normalize::statements(sql) {
        take(stmt);
    }
    // A string with transaction control decides itself what its SETs leave behind
    // (`BEGIN; SET ...; ROLLBACK` leaves nothing): it is not tracked, only marked.
    untracked |= untracked_set || (control && !all.iter().all(SessionStmt::is_local));
    Inspected {
        tracked: (!all.is_empty() && !control).then_some(SessionStmt::Many(all)),
        untracked,
    }
}

/// The value of a [`SetConfigCall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// A string literal, unescaped.
    Text(String),
    /// `$n`: the 0-based index of the parameter.
    Param(usize),
}

/// One `[pg_catalog.]set_config('name', value, local)` call of a statement that only
/// calls set_config: what applications send where `SET` cannot take a parameter (a
/// tenant id for row level security, a `search_path`, PostgREST's request settings).
/// `name` is lowercased (setting names are not case sensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfigCall {
    /// Lowercased when a literal; a parameter is named at Bind ([`SetConfigCall::tracked`]).
    pub name: ConfigValue,
    pub value: ConfigValue,
    /// `true` as the third argument: it lasts for the transaction (`SET LOCAL`).
    pub local: bool,
}

impl SetConfigCall {
    /// The statement that follows this call with `name` (this call's name, or the
    /// value of its parameter) and value `v`; `None` for a name the router does not
    /// replay.
    pub fn tracked(&self, name: &str, v: &str) -> Option<SessionStmt> {
        let name = name.to_ascii_lowercase();
        if !valid_name(&name) || name == "session_authorization" || name == "client_encoding" {
            return None;
        }
        let stmt = set_config_sql(&name, v, self.local);
        Some(if self.local {
            SessionStmt::SetLocal { name, stmt }
        } else {
            SessionStmt::SetConfig { name, stmt }
        })
    }
}

/// Recognizes a statement that is only `SELECT call, call, ...` of
/// [`SetConfigCall`]s; `None` for anything else (another column, an alias, an
/// `E'...'` string, a name the router does not replay: `session_authorization`,
/// `client_encoding`).
pub fn set_config_calls(sql: &str) -> Option<Vec<SetConfigCall>> {
    use crate::plan::normalize::{Tok, tokens};
    let toks: Vec<(Tok, &str)> = tokens(sql)
        .into_iter()
        .filter(|(k, ..)| *k != Tok::Space)
        .map(|(k, s, e)| (k, &sql[s..e]))
        .collect();
    let word = |t: Option<&(Tok, &str)>, w: &str| matches!(t, Some((Tok::Word, s)) if s.eq_ignore_ascii_case(w));
    let punct = |t: Option<&(Tok, &str)>, p: &str| matches!(t, Some((Tok::Punct, s)) if *s == p);
    let string = |t: Option<&(Tok, &str)>| match t {
        Some((Tok::Str, s)) if s.starts_with('\'') && s.len() >= 2 && s.ends_with('\'') => {
            Some(s[1..s.len() - 1].replace("''", "'"))
        }
        _ => None,
    };
    if !word(toks.first(), "select") {
        return None;
    }
    let mut calls = Vec::new();
    let mut i = 1;
    loop {
        if word(toks.get(i), "pg_catalog") && punct(toks.get(i + 1), ".") {
            i += 2;
        }
        if !word(toks.get(i), "set_config") || !punct(toks.get(i + 1), "(") {
            return None;
        }
        let arg = |t: Option<&(Tok, &str)>| match t {
            Some((Tok::Param, s)) => Some(ConfigValue::Param(
                s[1..].parse::<usize>().ok()?.checked_sub(1)?,
            )),
            t => Some(ConfigValue::Text(string(t)?)),
        };
        let name = match arg(toks.get(i + 2))? {
            ConfigValue::Text(n) => {
                let n = n.to_ascii_lowercase();
                if !valid_name(&n) || n == "session_authorization" || n == "client_encoding" {
                    return None;
                }
                ConfigValue::Text(n)
            }
            p => p,
        };
        if !punct(toks.get(i + 3), ",") {
            return None;
        }
        let value = arg(toks.get(i + 4))?;
        if !punct(toks.get(i + 5), ",") || !punct(toks.get(i + 7), ")") {
            return None;
        }
        let local = if word(toks.get(i + 6), "true") {
            true
        } else if word(toks.get(i + 6), "false") {
            false
        } else {
            return None;
        };
        calls.push(SetConfigCall { name, value, local });
        i += 8;
        if punct(toks.get(i), ",") {
            i += 1;
            continue;
        }
        let rest = &toks[i..];
        return (rest.is_empty() || matches!(rest, [(Tok::Semi, _)])).then_some(calls);
    }
}

/// What a statement of [`SetConfigCall`]s changes, each with its value: one
/// statement, or a `Many` of several.
pub fn set_config_tracked(all: Vec<SessionStmt>) -> Option<SessionStmt> {
    match all.len() {
        0 => None,
        1 => all.into_iter().next(),
        _ => Some(SessionStmt::Many(all)),
    }
}

/// The statement that replays a [`SetConfigCall`] of value `v`.
pub fn set_config_sql(name: &str, v: &str, local: bool) -> String {
    format!(
        "SELECT pg_catalog.set_config('{name}', {}, {local})",
        dollar_quote(v)
    )
}

/// Whether the text calls `set_config` (found by its underscore, which `memchr` finds
/// fast and SQL text has few of).
fn calls_set_config(b: &[u8]) -> bool {
    memchr::memchr_iter(b'_', b).any(|i| {
        i >= 3
            && b[i - 3..i].eq_ignore_ascii_case(b"set")
            && b.get(i + 1..i + 7)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"config"))
    })
}

/// `sql` from its first word: leading whitespace and comments (`--` to the end of
/// the line, `/* */` nested as Postgres nests them) skipped; "" if a comment does not
/// end.
fn skip_comments(sql: &str) -> &str {
    let mut s = sql.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("--") {
            // Postgres ends it at a carriage return too.
            s = rest
                .find(['\n', '\r'])
                .map_or("", |i| &rest[i + 1..])
                .trim_start();
        } else if s.starts_with("/*") {
            let b = s.as_bytes();
            let (mut depth, mut i) = (0usize, 0usize);
            loop {
                match b.get(i..i + 2) {
                    None => return "",
                    Some(b"/*") => {
                        depth += 1;
                        i += 2;
                    }
                    Some(b"*/") => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    Some(_) => i += 1,
                }
            }
            s = s[i..].trim_start();
        } else {
            return s;
        }
    }
}

/// Whether a statement `classify` did not take (`stmt` from its first word) may change
/// session settings: a SET, RESET or DISCARD of a kind or spelling it leaves alone
/// (`SET/**/x = 1`, `SET SESSION AUTHORIZATION`), except `SET LOCAL`, `SET
/// TRANSACTION` and `SET CONSTRAINTS`, which end with the transaction.
fn changes_settings(stmt: &str) -> bool {
    let word = |s: &str| -> usize {
        s.find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(s.len())
    };
    let first = &stmt[..word(stmt)];
    if first.eq_ignore_ascii_case("reset") || first.eq_ignore_ascii_case("discard") {
        return true;
    }
    if !first.eq_ignore_ascii_case("set") {
        return false;
    }
    let rest = skip_comments(&stmt[first.len()..]);
    let second = &rest[..word(rest)];
    !["local", "transaction", "constraints"]
        .iter()
        .any(|k| second.eq_ignore_ascii_case(k))
}

/// Recognizes the single statements whose effect outlives a transaction and that the
/// router must track. Anything else (including several statements in one Query) is
/// `None` and passes through untracked.
pub fn classify(sql: &str) -> Option<SessionStmt> {
    // Fast exit for the common case (no allocation): only SET, RESET, DISCARD and
    // DEALLOCATE are tracked.
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()?;
    if !["set", "reset", "discard", "deallocate"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k))
    {
        return None;
    }
    let s = sql.trim().trim_end_matches(';').trim();
    if s.is_empty() {
        return None;
    }
    let cleaned;
    let s = if s.contains(';') || s.contains("--") || s.contains("/*") {
        // Read by the lexer: a `;` or comment marker inside a string is the value's,
        // comments (sqlcommenter's trailing `/*...*/`) become spaces, and a `;`
        // outside one makes several statements (not this function's).
        use crate::plan::normalize::{Tok, tokens};
        let toks = tokens(s);
        let end = toks
            .iter()
            .rposition(|(k, ..)| !matches!(k, Tok::Space | Tok::Semi))?;
        let mut out = String::with_capacity(s.len());
        for &(k, a, b) in &toks[..=end] {
            match k {
                Tok::Semi => return None,
                // A line break stays one: Postgres joins two string literals
                // separated by one (`'a'` newline `'b'` is `'ab'`).
                Tok::Space if s[a..b].contains(['\n', '\r']) => {
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Tok::Space => {
                    if !out.ends_with([' ', '\n']) {
                        out.push(' ');
                    }
                }
                _ => out.push_str(&s[a..b]),
            }
        }
        cleaned = out;
        cleaned.trim()
    } else {
        s
    };
    let lower = s.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    match words.as_slice() {
        // `SET [LOCAL] TRANSACTION <modes>`: the transaction's isolation level, access
        // mode and deferrability, which every node of the transaction must have (a
        // node joining later runs it right after its BEGIN). A snapshot is one node's.
        ["set", "transaction", mode, ..]
        | ["set", "local" | "session", "transaction", mode, ..]
            if !mode.starts_with("snapshot") =>
        {
            Some(SessionStmt::SetLocal {
                name: "transaction".into(),
                stmt: s.to_owned(),
            })
        }
        // `SET LOCAL ROLE`: every node of the transaction runs as that role (it ends
        // with the transaction, as the others).
        ["set", "local", "role", _, ..] => Some(SessionStmt::SetLocal {
            name: "role".into(),
            stmt: s.to_owned(),
        }),
        [
            "set",
            "local",
            "role" | "session" | "transaction" | "characteristics",
            ..,
        ] => None,
        ["set", "local", name, ..] => {
            let name = set_name(name, &words)?;
            Some(SessionStmt::SetLocal {
                name,
                stmt: s.to_owned(),
            })
        }
        ["set", "transaction", ..] | ["set", "constraints", ..] => None,
        ["set", "session", "transaction", ..] => None,
        ["set", "session", "characteristics", "as", "transaction", ..] => {
            characteristics(&words[5..].join(" "))
        }
        ["set", "session", "characteristics", ..] => None,
        ["set", "session", "authorization", ..] => None,
        ["set", "session", name, ..] | ["set", name, ..] => {
            let name = set_name(name, &words)?;
            if name == "session_authorization" {
                // SET SESSION AUTHORIZATION spelled as a setting: RESET ALL leaves it,
                // and it resets the role. Not tracked (the connection is marked).
                return None;
            }
            Some(SessionStmt::Set {
                name,
                stmt: s.to_owned(),
            })
        }
        ["reset", "all"] => Some(SessionStmt::ResetAll),
        ["reset", "time", "zone"] => Some(SessionStmt::Reset {
            name: "timezone".into(),
        }),
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

/// Why SET SESSION AUTHORIZATION is refused where there are distributed tables.
pub const SESSION_AUTHORIZATION_REFUSED: &str = "SET SESSION AUTHORIZATION is not followed on the worker nodes of distributed tables (they would keep the login's identity and rights): use SET ROLE, which is";

/// Whether a string changes the session's identity with SET SESSION AUTHORIZATION (in
/// any spelling, `DEFAULT` aside): the router does not follow that to the workers,
/// which would keep the login's identity (and its rights).
pub fn sets_session_authorization(sql: &str) -> bool {
    crate::plan::normalize::statements(sql)
        .into_iter()
        .any(|stmt| {
            let lower = stmt.to_ascii_lowercase();
            let words: Vec<&str> = lower
                .split(|c: char| c.is_whitespace() || c == ';')
                .filter(|w| !w.is_empty())
                .collect();
            let not_default = |w: Option<&&str>| w.is_some_and(|w| *w != "default");
            match words.as_slice() {
                [
                    "set",
                    "session" | "local",
                    "session",
                    "authorization",
                    rest @ ..,
                ]
                | ["set", "session", "authorization", rest @ ..] => not_default(rest.first()),
                [
                    "set",
                    "session" | "local",
                    "session_authorization",
                    "=" | "to",
                    rest @ ..,
                ]
                | ["set", "session_authorization", "=" | "to", rest @ ..] => {
                    not_default(rest.first())
                }
                _ => lower.contains("set_config") && lower.contains("session_authorization"),
            }
        })
}

/// Whether a statement changes the transaction's modes (`SET TRANSACTION ...`, or
/// the `transaction_isolation` / `_read_only` / `_deferrable` settings), which Postgres
/// accepts or refuses depending on whether the transaction already ran a query.
pub fn is_transaction_mode(t: &SessionStmt) -> bool {
    match t {
        SessionStmt::SetLocal { name, .. } if name == "transaction" => true,
        SessionStmt::Set { name, .. }
        | SessionStmt::SetLocal { name, .. }
        | SessionStmt::SetConfig { name, .. } => matches!(
            name.as_str(),
            "transaction_isolation" | "transaction_read_only" | "transaction_deferrable"
        ),
        SessionStmt::Many(all) => all.iter().any(is_transaction_mode),
        _ => false,
    }
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION <modes>` (`modes` lowercased): the
/// defaults of the session's later transactions, that is, SETs of
/// `default_transaction_isolation`, `_read_only` and `_deferrable`, recorded as such
/// (so that a later SET or RESET of one of them replaces it). `None` for what it
/// does not read: the statement is then marked as untracked.
fn characteristics(modes: &str) -> Option<SessionStmt> {
    let words: Vec<&str> = modes
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    let mut sets = Vec::new();
    let mut set = |name: &str, value: &str| {
        sets.push(SessionStmt::Set {
            name: name.into(),
            stmt: format!("SET {name} TO '{value}'"),
        })
    };
    let mut w = words.as_slice();
    while !w.is_empty() {
        w = match w {
            ["isolation", "level", "serializable", rest @ ..] => {
                set("default_transaction_isolation", "serializable");
                rest
            }
            ["isolation", "level", "repeatable", "read", rest @ ..] => {
                set("default_transaction_isolation", "repeatable read");
                rest
            }
            [
                "isolation",
                "level",
                "read",
                level @ ("committed" | "uncommitted"),
                rest @ ..,
            ] => {
                set("default_transaction_isolation", &format!("read {level}"));
                rest
            }
            ["read", mode @ ("only" | "write"), rest @ ..] => {
                set(
                    "default_transaction_read_only",
                    if *mode == "only" { "on" } else { "off" },
                );
                rest
            }
            ["deferrable", rest @ ..] => {
                set("default_transaction_deferrable", "on");
                rest
            }
            ["not", "deferrable", rest @ ..] => {
                set("default_transaction_deferrable", "off");
                rest
            }
            _ => return None,
        };
    }
    match sets.len() {
        0 => None,
        1 => sets.pop(),
        _ => Some(SessionStmt::Many(sets)),
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
    #[test]
    fn sets_inside_strings_of_several_statements_are_found() {
        use super::{Inspected, SessionStmt, inspect};
        let Inspected {
            tracked: Some(SessionStmt::Many(all)),
            untracked: false,
        } = inspect("SET a.b = 1; SELECT ';'; reset c.d ; DISCARD ALL; DEALLOCATE x")
        else {
            panic!("not found");
        };
        assert_eq!(all.len(), 3);
        assert!(matches!(&all[0], SessionStmt::Set { name, .. } if name == "a.b"));
        assert!(matches!(&all[1], SessionStmt::Reset { name } if name == "c.d"));
        assert!(matches!(all[2], SessionStmt::DiscardAll));
        assert_eq!(inspect("SELECT 1; SELECT 2"), Inspected::default());
        assert_eq!(inspect("SELECT 'set'; SELECT 2"), Inspected::default());
        assert!(matches!(
            inspect("SET a.b = 1"),
            Inspected {
                tracked: Some(SessionStmt::Set { .. }),
                untracked: false
            }
        ));
        // OLTP statements are neither.
        for sql in [
            "UPDATE t SET a = 1 WHERE id = 2",
            "BEGIN; UPDATE t SET a = 1; COMMIT",
            "SELECT * FROM dist WHERE k = 1",
            "BEGIN; SET LOCAL work_mem = '1MB'; SELECT 1; COMMIT",
            "PREPARE p AS SELECT 1; SET a.b = 1",
        ] {
            let i = inspect(sql);
            assert!(!i.untracked, "{sql}");
            assert_eq!(
                i.tracked.is_some(),
                sql.starts_with("PREPARE"),
                "{sql}: SQL PREPARE is not transaction control"
            );
        }
        // What the router cannot follow is marked, never recorded.
        for sql in [
            "SELECT set_config('a.b', 'x', false), 1",
            "SELECT set_config('a.b', E'x', false)",
            "SELECT set_config('a.b', 'x' || 'y', false)",
            "SELECT set_config('client_encoding', 'LATIN1', false)",
            "SELECT set_config('session_authorization', 'bob', false)",
            "SELECT * FROM set_config('a.b', 'x', false)",
            "select PG_CATALOG.SET_CONFIG('a.b', '1', false); select 1",
            "SET SESSION AUTHORIZATION nobody",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ LOUDLY",
            "SET\"work_mem\" = 1",
            "SET session_authorization = 'bob'",
            "BEGIN; SET search_path = x; COMMIT",
            "SET a.b = 1; /* c */ ROLLBACK",
        ] {
            let i = inspect(sql);
            assert!(i.untracked, "{sql}");
            assert!(i.tracked.is_none(), "{sql}");
        }
        // Comments (sqlcommenter's among them) and a `;` or comment marker inside a
        // value: read by the lexer, replayed without the comments.
        for (sql, want) in [
            ("SET search_path = x -- trailing", "SET search_path = x"),
            ("/* a */ SET /* b */ search_path = x", "SET search_path = x"),
            ("SET/**/work_mem = 1", "SET work_mem = 1"),
            (
                "SET LOCAL app.t = 'a;b' /*controller='x',route='/a;b'*/;",
                "SET LOCAL app.t = 'a;b'",
            ),
            ("SET LOCAL app.t = '-- c' -- c", "SET LOCAL app.t = '-- c'"),
            ("SET LOCAL ROLE r /* c */", "SET LOCAL ROLE r"),
            ("SET app.t = 'x' -- c\n'y'", "SET app.t = 'x' \n'y'"),
            ("SET app.t = 'a;b'\n  'c'", "SET app.t = 'a;b'\n'c'"),
        ] {
            let i = inspect(sql);
            let stmt = match &i.tracked {
                Some(SessionStmt::Set { stmt, .. } | SessionStmt::SetLocal { stmt, .. }) => stmt,
                t => panic!("{sql}: {t:?}"),
            };
            assert_eq!(stmt, want, "{sql}");
            assert!(!i.untracked, "{sql}");
        }
        assert!(
            matches!(inspect("RESET/**/work_mem").tracked, Some(SessionStmt::Reset { name }) if name == "work_mem")
        );
        for sql in [
            "SELECT 1; DISCARD /* c */ ALL",
            "SELECT 1; SET a.b = 1 -- trailing",
        ] {
            assert!(
                matches!(inspect(sql).tracked, Some(SessionStmt::Many(_))),
                "{sql}"
            );
        }
        assert_eq!(classify("SET LOCAL a.b = 1; SET LOCAL c.d = 2"), None);
    }

    #[test]
    fn set_config_alone_is_a_set() {
        let text = |n: &str, v: &str| {
            Some(vec![SetConfigCall {
                name: ConfigValue::Text(n.into()),
                value: ConfigValue::Text(v.into()),
                local: false,
            }])
        };
        assert_eq!(
            set_config_calls("SELECT set_config('search_path', 'a, b', false)"),
            text("search_path", "a, b")
        );
        assert_eq!(
            set_config_calls(
                " select PG_CATALOG . Set_Config ( 'App.Tenant' , 'it''s' , FALSE ) ; "
            ),
            text("app.tenant", "it's")
        );
        assert_eq!(
            set_config_calls(
                "SELECT /* c */ set_config('a.b', $2, false), pg_catalog.set_config('role', $1, TRUE),set_config('c.d','x',true)"
            ),
            Some(vec![
                SetConfigCall {
                    name: ConfigValue::Text("a.b".into()),
                    value: ConfigValue::Param(1),
                    local: false,
                },
                SetConfigCall {
                    name: ConfigValue::Text("role".into()),
                    value: ConfigValue::Param(0),
                    local: true,
                },
                SetConfigCall {
                    name: ConfigValue::Text("c.d".into()),
                    value: ConfigValue::Text("x".into()),
                    local: true,
                }
            ])
        );
        for sql in [
            "SELECT set_config('a.b', $0, false)",
            "SELECT set_config('a.b', 'x', false) x",
            "SELECT set_config('a b', 'x', false)",
            "SELECT set_config('a.b', 'x')",
            "SELECT set_config('a.b', 'x', maybe)",
            "SELECT set_config('a.b', 'x', true),",
            "SELECT set_config('a.b', 'x', true), 1",
            "SELECT set_config('a.b', 'x', true), set_config('client_encoding', 'x', true)",
        ] {
            assert_eq!(set_config_calls(sql), None, "{sql}");
        }
        // A name as a parameter: named at Bind (and checked then).
        let calls = set_config_calls("SELECT set_config($1, $2, true)").unwrap();
        assert_eq!(calls[0].name, ConfigValue::Param(0));
        assert!(calls[0].tracked("App.T", "v").is_some_and(|t| t.is_local()));
        assert_eq!(calls[0].tracked("client_encoding", "x"), None);
        assert_eq!(calls[0].tracked("a b", "x"), None);
        assert!(inspect("SELECT set_config($1, 'x', false)").untracked);
        // Transaction-local calls are SET LOCALs, answered `SELECT 1`, replayed as such.
        let i = inspect("select set_config('app.t', 'v', true), set_config('a.b', 'w', false)");
        assert!(!i.untracked);
        let Some(SessionStmt::Many(all)) = i.tracked else {
            panic!("{i:?}")
        };
        assert_eq!(
            all,
            [
                SessionStmt::SetLocal {
                    name: "app.t".into(),
                    stmt: "SELECT pg_catalog.set_config('app.t', $sg$v$sg$, true)".into()
                },
                SessionStmt::SetConfig {
                    name: "a.b".into(),
                    stmt: "SELECT pg_catalog.set_config('a.b', $sg$w$sg$, false)".into()
                }
            ]
        );
        assert_eq!(all[0].tag(), b"SELECT 1");
        assert!(all[0].is_local() && !all[1].is_local());
        let i = inspect("SELECT pg_catalog.set_config('search_path', 'a, b', false);");
        assert!(!i.untracked);
        assert_eq!(
            i.tracked,
            Some(SessionStmt::SetConfig {
                name: "search_path".into(),
                stmt: "SELECT pg_catalog.set_config('search_path', $sg$a, b$sg$, false)".into()
            })
        );
        assert_eq!(i.tracked.unwrap().tag(), b"SELECT 1");
    }

    #[test]
    fn leading_comments_are_skipped() {
        for sql in [
            "/* c */ SET search_path = x",
            "-- c\nSET search_path = x",
            "  /* a /* nested */ b */ -- c\n SET search_path = x",
            "-- c\rSET search_path = x",
        ] {
            assert!(
                matches!(inspect(sql), Inspected { tracked: Some(SessionStmt::Set { name, .. }), untracked: false } if name == "search_path"),
                "{sql}"
            );
        }
        assert_eq!(skip_comments("/* unterminated"), "");
        assert_eq!(skip_comments("-- only"), "");
        assert_eq!(skip_comments("/* é */ SELECT 1"), "SELECT 1");
        assert!(calls_set_config(
            b"SELECT pg_catalog.SET_CONFIG('a', 'b', false)"
        ));
        assert!(!calls_set_config(b"SELECT set_conf, _config, set_"));
    }

    #[test]
    fn reset_all_keeps_the_role_and_apply_resets_it() {
        let mut s = Settings::from_startup(&[]).unwrap();
        s.record(&classify("SET ROLE app").unwrap());
        s.record(&classify("SET work_mem = '8MB'").unwrap());
        s.record(&SessionStmt::ResetAll);
        let sql = s.apply_sql();
        assert!(sql.starts_with("RESET ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE"));
        assert!(sql.ends_with("; SET ROLE app"), "{sql}");
        assert!(!sql.contains("work_mem"));
        s.record(&SessionStmt::DiscardAll);
        assert_eq!(s.fingerprint(), 0);
        // A connection with untracked changes is this session's own, nobody else's.
        let other = Settings::from_startup(&[]).unwrap();
        let u = s.untracked_fingerprint();
        assert!(s.applied(u) && s.applied(0));
        assert!(!other.applied(u));
        assert!(u % 8 == 4);
    }

    use super::*;

    #[test]
    fn session_authorization_changes() {
        for sql in [
            "SET SESSION AUTHORIZATION carol",
            "set session session authorization 'carol'",
            "SET LOCAL SESSION AUTHORIZATION carol",
            "SET session_authorization = carol",
            "SET session_authorization TO 'carol'",
            "SELECT 1; SET SESSION AUTHORIZATION carol",
            "SELECT set_config('session_authorization', 'carol', false)",
        ] {
            assert!(sets_session_authorization(sql), "{sql}");
        }
        for sql in [
            "SET SESSION AUTHORIZATION DEFAULT",
            "RESET SESSION AUTHORIZATION",
            "SET session_authorization = default",
            "SELECT 'session authorization'",
            "SET ROLE carol",
        ] {
            assert!(!sets_session_authorization(sql), "{sql}");
        }
    }

    #[test]
    fn modes_that_must_come_before_any_query() {
        let t = |sql: &str| classify(sql).unwrap();
        for (sql, mode) in [
            ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", true),
            ("SET TRANSACTION READ ONLY", true),
            ("set transaction not deferrable", true),
            ("SET LOCAL transaction_isolation = 'serializable'", true),
            ("SET transaction_read_only = on", true),
            ("SET LOCAL work_mem = '1MB'", false),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                false,
            ),
        ] {
            assert_eq!(is_transaction_mode(&t(sql)), mode, "{sql}");
        }
        // `BEGIN; SET ...` in one string: tracked; with other transaction control, not.
        let i = inspect("BEGIN; SET TRANSACTION READ ONLY; SET LOCAL a.b = 1");
        assert!(
            matches!(&i.tracked, Some(SessionStmt::Many(all)) if all.len() == 2),
            "{i:?}"
        );
        assert!(
            inspect("COMMIT; BEGIN; SET LOCAL a.b = 1")
                .tracked
                .is_none()
        );
        assert!(
            inspect("BEGIN; SET LOCAL a.b = 1; COMMIT")
                .tracked
                .is_none()
        );
    }

    #[test]
    fn dollar_quotes_close_where_the_value_ends() {
        for v in ["x", "x$sg", "$sg$", "a$sg$b$sg1$", "x$sg1", "$", ""] {
            let q = dollar_quote(v);
            let tag = &q[..q[1..].find('$').unwrap() + 2];
            assert!(q.ends_with(tag), "{q}");
            assert_eq!(&q[tag.len()..q.len() - tag.len()], v, "{q}");
            // The literal ends where the value does.
            assert_eq!(q[tag.len()..].find(tag), Some(v.len()), "{v:?}: {q}");
        }
        // In a string of several statements too: its SETs are tracked, not lost.
        let i = inspect("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; SELECT 1");
        let Some(SessionStmt::Many(all)) = i.tracked else {
            panic!("{i:?}")
        };
        assert!(
            matches!(&all[..], [SessionStmt::Set { name, .. }] if name == "default_transaction_read_only")
        );
        let i = inspect("BEGIN; SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; COMMIT");
        assert!(i.untracked && i.tracked.is_none(), "{i:?}");
    }

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
        assert!(matches!(
            classify("SET LOCAL work_mem = '1MB'"),
            Some(SessionStmt::SetLocal { name, .. }) if name == "work_mem"
        ));
        assert!(matches!(
            classify("set local time zone 'UTC'"),
            Some(SessionStmt::SetLocal { name, .. }) if name == "timezone"
        ));
        assert!(matches!(
            classify("SET LOCAL ROLE nobody"),
            Some(SessionStmt::SetLocal { name, .. }) if name == "role"
        ));
        assert!(matches!(
            classify("RESET TIME ZONE"),
            Some(SessionStmt::Reset { name }) if name == "timezone"
        ));
        for sql in [
            "SET LOCAL TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "set transaction read only, not deferrable",
        ] {
            assert_eq!(
                classify(sql),
                Some(SessionStmt::SetLocal {
                    name: "transaction".into(),
                    stmt: sql.into()
                })
            );
        }
        assert_eq!(classify("SET TRANSACTION SNAPSHOT '00000003-1'"), None);
        assert_eq!(classify("SET TRANSACTION SNAPSHOT'00000003-1'"), None);
        assert_eq!(
            classify("SET SESSION TRANSACTION SNAPSHOT '00000003-1'"),
            None
        );
        assert!(matches!(
            classify("SET SESSION TRANSACTION READ ONLY"),
            Some(SessionStmt::SetLocal { name, .. }) if name == "transaction"
        ));
        for sql in [
            "SET LOCAL role TO x",
            "SET LOCAL ROLE = x",
            "SET LOCAL ROLE \"a b\"",
        ] {
            assert!(
                matches!(classify(sql), Some(SessionStmt::SetLocal { name, .. }) if name == "role"),
                "{sql}"
            );
        }
        assert_eq!(classify("SET TRANSACTION"), None);
        assert_eq!(
            classify("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
            Some(SessionStmt::Set {
                name: "default_transaction_isolation".into(),
                stmt: "SET default_transaction_isolation TO 'repeatable read'".into()
            })
        );
        let Some(SessionStmt::Many(all)) = classify(
            "set session characteristics as transaction read only,isolation level serializable deferrable",
        ) else {
            panic!("several modes")
        };
        let names: Vec<_> = all
            .iter()
            .map(|t| match t {
                SessionStmt::Set { name, stmt } => format!("{name}: {stmt}"),
                t => panic!("{t:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "default_transaction_read_only: SET default_transaction_read_only TO 'on'",
                "default_transaction_isolation: SET default_transaction_isolation TO 'serializable'",
                "default_transaction_deferrable: SET default_transaction_deferrable TO 'on'",
            ]
        );
        assert_eq!(
            classify("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL LOUD"),
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
        assert!(sql.starts_with(
            "RESET ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; SET application_name TO $sg1$it's $sg$$sg1$"
        ));
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
