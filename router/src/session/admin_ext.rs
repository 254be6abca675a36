//! Admin functions through the extended protocol, as drivers send them: a batch made
//! only of Parse / Bind / Describe / Execute / Close messages about admin calls, ended
//! by Sync, is answered by the router (statements and portals kept per session, `$n`
//! parameters bound as constants), so `conn.execute("SELECT create_distributed_table
//! ($1, $2)", ...)` works from psycopg, tokio-postgres, JDBC and the like. A batch
//! that mixes admin calls with other statements is refused (see `refuse_extended_admin`).

use super::Session;
use crate::admin::{AdminCtx, AdminError, Reply, Request, classify_with};
use crate::backend::control::ControlLogin;
use crate::catalog::Snapshot;
use crate::error::RouterError;
use crate::protocol::{self, Frame, TxnStatus, btag, tag};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// A statement the router keeps for the client: its SQL and parameter types.
#[derive(Debug, Clone)]
pub(super) struct AdminStmt {
    sql: String,
    types: Vec<u32>,
}

/// A bound admin call, waiting for Execute.
#[derive(Debug)]
pub(super) struct AdminPortal {
    sql: String,
    params: Vec<Option<String>>,
    /// Result column formats (0 text, 1 binary) as the client asked.
    formats: Vec<i16>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Whether every message of the buffered batch is about admin statements.
    fn admin_batch(&self, end: Option<&Frame>) -> bool {
        if !matches!(end, Some(f) if f.tag == tag::SYNC)
            || self.status != TxnStatus::Idle
            || !self.expect.is_empty()
            || self.needs_sync
            || self.skip_until_sync
            || self.batch.is_empty()
        {
            return false;
        }
        let mut stmts: Vec<&[u8]> = Vec::new();
        let mut portals: Vec<&[u8]> = Vec::new();
        for f in &self.batch {
            let ok = match f.tag {
                tag::PARSE => match protocol::decode_parse(f.body()) {
                    Ok(p) => {
                        let is_admin = std::str::from_utf8(p.query)
                            .ok()
                            .and_then(|q| self.admin_check(q))
                            .is_some_and(|r| r.is_ok());
                        if is_admin {
                            stmts.push(p.name);
                        }
                        is_admin
                    }
                    Err(_) => false,
                },
                tag::BIND => match protocol::decode_bind(f.body()) {
                    Ok(b) => {
                        let known = stmts.contains(&b.statement)
                            || self.admin_stmts.contains_key(b.statement);
                        if known {
                            portals.push(b.portal);
                        }
                        known
                    }
                    Err(_) => false,
                },
                tag::DESCRIBE | tag::CLOSE => match protocol::decode_target(f.body()) {
                    Ok((b'S', n)) => stmts.contains(&n) || self.admin_stmts.contains_key(n),
                    Ok((_, n)) => portals.contains(&n) || self.admin_portals.contains_key(n),
                    Err(_) => false,
                },
                tag::EXECUTE => {
                    let body = f.body();
                    let name = &body[..body.iter().position(|&b| b == 0).unwrap_or(0)];
                    portals.contains(&name) || self.admin_portals.contains_key(name)
                }
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Answers a batch of admin messages (and its Sync) when `admin_batch` says so.
    pub(super) async fn try_admin_batch(
        &mut self,
        end: Option<&Frame>,
    ) -> Result<bool, RouterError> {
        if !self.admin_batch(end) {
            return Ok(false);
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        for f in &batch {
            if let Err(e) = self.admin_message(f).await {
                let e = RouterError::Admin(e);
                self.client_error(&e);
                break;
            }
        }
        protocol::encode_ready_for_query(&mut self.out, self.status);
        // Portals end with the (implicit) transaction at Sync, as in Postgres.
        self.admin_portals.clear();
        Ok(true)
    }

    /// A batch that goes to the backend redefines the statement and portal names it
    /// uses: the router's admin statements of those names are gone.
    pub(super) fn forget_admin_names(&mut self, end: Option<&Frame>) {
        if self.admin_stmts.is_empty() && self.admin_portals.is_empty() {
            return;
        }
        for f in &self.batch {
            match f.tag {
                tag::PARSE => {
                    if let Ok(p) = protocol::decode_parse(f.body()) {
                        self.admin_stmts.remove(p.name);
                    }
                }
                tag::BIND => {
                    if let Ok(b) = protocol::decode_bind(f.body()) {
                        self.admin_portals.remove(b.portal);
                    }
                }
                tag::CLOSE => match protocol::decode_target(f.body()) {
                    Ok((b'S', n)) => {
                        self.admin_stmts.remove(n);
                    }
                    Ok((_, n)) => {
                        self.admin_portals.remove(n);
                    }
                    Err(_) => {}
                },
                _ => {}
            }
        }
        if matches!(end, Some(f) if f.tag == tag::SYNC) {
            self.admin_portals.clear();
        }
    }

    async fn admin_message(&mut self, f: &Frame) -> Result<(), AdminError> {
        let bad = |m: &'static str| AdminError::Syntax(format!("malformed {m} message"));
        match f.tag {
            tag::PARSE => {
                let p = protocol::decode_parse(f.body()).map_err(|_| bad("Parse"))?;
                let sql = String::from_utf8_lossy(p.query).into_owned();
                let mut types: Vec<u32> = p.param_types[2..]
                    .chunks(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let wanted = crate::admin::placeholder_types(&sql);
                if types.len() < wanted.len() {
                    types.resize(wanted.len(), 0);
                }
                for (t, w) in types.iter_mut().zip(wanted) {
                    if *t == 0 {
                        *t = w;
                    }
                }
                self.admin_stmts
                    .insert(Bytes::copy_from_slice(p.name), AdminStmt { sql, types });
                protocol::encode_parse_complete(&mut self.out);
            }
            tag::BIND => {
                let b = protocol::decode_bind(f.body()).map_err(|_| bad("Bind"))?;
                let stmt = self
                    .admin_stmts
                    .get(b.statement)
                    .cloned()
                    .ok_or_else(|| bad("Bind"))?;
                let (params, formats) =
                    decode_bind_values(b.rest, &stmt.types).ok_or_else(|| bad("Bind"))?;
                self.admin_portals.insert(
                    Bytes::copy_from_slice(b.portal),
                    AdminPortal {
                        sql: stmt.sql,
                        params,
                        formats,
                    },
                );
                self.out.put_u8(btag::BIND_COMPLETE);
                self.out.put_i32(4);
            }
            tag::DESCRIBE => {
                let (kind, name) =
                    protocol::decode_target(f.body()).map_err(|_| bad("Describe"))?;
                let (sql, params, formats) = if kind == b'S' {
                    let s = self.admin_stmts.get(name).ok_or_else(|| bad("Describe"))?;
                    // ParameterDescription
                    let mut body = BytesMut::new();
                    body.put_i16(s.types.len() as i16);
                    for t in &s.types {
                        body.put_u32(*t);
                    }
                    frame(&mut self.out, btag::PARAMETER_DESCRIPTION, &body);
                    (s.sql.clone(), vec![None; s.types.len()], Vec::new())
                } else {
                    let p = self
                        .admin_portals
                        .get(name)
                        .ok_or_else(|| bad("Describe"))?;
                    (p.sql.clone(), p.params.clone(), p.formats.clone())
                };
                let columns = self.admin_request(&sql, &params)?.columns();
                if columns.is_empty() {
                    self.out.put_u8(btag::NO_DATA);
                    self.out.put_i32(4);
                } else {
                    encode_row_description(&mut self.out, &columns, &formats);
                }
            }
            tag::EXECUTE => {
                let body = f.body();
                let name = &body[..body.iter().position(|&b| b == 0).unwrap_or(0)];
                let p = self
                    .admin_portals
                    .remove(name)
                    .ok_or_else(|| bad("Execute"))?;
                let req = self.admin_request(&p.sql, &p.params)?;
                let columns = req.columns();
                let reply = self.run_admin_request(req).await?;
                encode_notices(&mut self.out, &reply);
                encode_rows(&mut self.out, &reply, &columns, &p.formats);
            }
            tag::CLOSE => {
                let (kind, name) = protocol::decode_target(f.body()).map_err(|_| bad("Close"))?;
                if kind == b'S' {
                    self.admin_stmts.remove(name);
                } else {
                    self.admin_portals.remove(name);
                }
                protocol::encode_close_complete(&mut self.out);
            }
            _ => return Err(bad("extended")),
        }
        Ok(())
    }

    fn admin_request(&self, sql: &str, params: &[Option<String>]) -> Result<Request, AdminError> {
        let guard = self.ctx.catalog.peek();
        let snap: &Snapshot = &guard;
        classify_with(snap, sql, params)?.ok_or_else(|| {
            AdminError::NotSupported("the statement is no longer an admin call".into())
        })
    }

    /// Runs one request with the session's rights (shared with the simple protocol).
    pub(super) async fn run_admin_request(&mut self, req: Request) -> Result<Reply, AdminError> {
        let node = &self.ctx.config.coordinator;
        let actx = AdminCtx {
            server: &self.ctx,
            login: ControlLogin {
                user: self.user.name.clone(),
                password: self.user.server_password.clone(),
                connect_timeout: self.ctx.config.connect_timeout,
                host: node.host.clone(),
                port: node.port,
            },
            database: self.database.clone(),
            settings_sql: self.settings.control_sql(),
        };
        let start = std::time::Instant::now();
        let what = req.describe();
        let result = actx.execute(req).await;
        tracing::info!(
            what,
            ok = result.is_ok(),
            ms = start.elapsed().as_millis() as u64,
            "admin request"
        );
        result
    }
}

/// Bind's parameter values as text (binary values decoded by their type), and the
/// result formats.
fn decode_bind_values(rest: &[u8], types: &[u32]) -> Option<(Vec<Option<String>>, Vec<i16>)> {
    let mut r = rest;
    let i16_ = |r: &mut &[u8]| -> Option<i16> {
        let v = i16::from_be_bytes(r.get(..2)?.try_into().ok()?);
        *r = &r[2..];
        Some(v)
    };
    let nf = i16_(&mut r)?.max(0) as usize;
    let mut fmts = Vec::with_capacity(nf);
    for _ in 0..nf {
        fmts.push(i16_(&mut r)?);
    }
    let np = i16_(&mut r)?.max(0) as usize;
    let mut params = Vec::with_capacity(np);
    for i in 0..np {
        let len = i32::from_be_bytes(r.get(..4)?.try_into().ok()?);
        r = &r[4..];
        if len < 0 {
            params.push(None);
            continue;
        }
        let v = r.get(..len as usize)?;
        r = &r[len as usize..];
        let fmt = match nf {
            0 => 0,
            1 => fmts[0],
            _ => *fmts.get(i)?,
        };
        let text = if fmt == 0 {
            String::from_utf8_lossy(v).into_owned()
        } else {
            match (types.get(i).copied().unwrap_or(0), v.len()) {
                (20, 8) => i64::from_be_bytes(v.try_into().ok()?).to_string(),
                (23, 4) => i32::from_be_bytes(v.try_into().ok()?).to_string(),
                (21, 2) => i16::from_be_bytes(v.try_into().ok()?).to_string(),
                (16, 1) => (v[0] != 0).to_string(),
                (2950, 16) => v.iter().map(|b| format!("{b:02x}")).collect(),
                _ => String::from_utf8_lossy(v).into_owned(),
            }
        };
        params.push(Some(text));
    }
    let nr = i16_(&mut r)?.max(0) as usize;
    let mut res = Vec::with_capacity(nr);
    for _ in 0..nr {
        res.push(i16_(&mut r)?);
    }
    Some((params, res))
}

fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats.len() {
        0 => 0,
        1 => formats[0],
        _ => formats.get(i).copied().unwrap_or(0),
    }
}

pub(super) fn encode_row_description(
    out: &mut BytesMut,
    columns: &[(String, u32)],
    formats: &[i16],
) {
    let mut body = BytesMut::new();
    body.put_i16(columns.len() as i16);
    for (i, (name, oid)) in columns.iter().enumerate() {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_u32(0);
        body.put_i16(0);
        body.put_u32(*oid);
        body.put_i16(match *oid {
            20 => 8,
            23 => 4,
            crate::admin::VOID_OID => 4,
            _ => -1,
        });
        body.put_i32(-1);
        body.put_i16(format_of(formats, i));
    }
    frame(out, btag::ROW_DESCRIPTION, &body);
}

pub(super) fn encode_notices(out: &mut BytesMut, reply: &Reply) {
    for n in &reply.notices {
        protocol::encode_error_fields(
            out,
            btag::NOTICE_RESPONSE,
            &[
                (b'S', "NOTICE"),
                (b'V', "NOTICE"),
                (b'C', "00000"),
                (b'M', n),
            ],
        );
    }
}

/// DataRows (text or binary, as asked) and CommandComplete.
pub(super) fn encode_rows(
    out: &mut BytesMut,
    reply: &Reply,
    columns: &[(String, u32)],
    formats: &[i16],
) {
    for row in &reply.rows {
        let mut body = BytesMut::new();
        body.put_i16(row.len() as i16);
        for (i, v) in row.iter().enumerate() {
            let Some(v) = v else {
                body.put_i32(-1);
                continue;
            };
            let binary = format_of(formats, i) == 1;
            let oid = columns.get(i).map(|c| c.1).unwrap_or(25);
            match (binary, oid) {
                (true, 20) => {
                    body.put_i32(8);
                    body.put_i64(v.parse().unwrap_or(0));
                }
                (true, 23) => {
                    body.put_i32(4);
                    body.put_i32(v.parse().unwrap_or(0));
                }
                (true, crate::admin::VOID_OID) => body.put_i32(0),
                _ => {
                    body.put_i32(v.len() as i32);
                    body.put_slice(v.as_bytes());
                }
            }
        }
        frame(out, btag::DATA_ROW, &body);
    }
    crate::protocol::encode_command_complete(out, &reply.tag);
}

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(body);
}
