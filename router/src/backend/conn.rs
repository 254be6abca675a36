//! One connection from the router to a Postgres node: connect, start up, log in, and
//! then raw reads and writes for the session that holds it.

use super::BackendError;
use crate::protocol::{self, Frame, TxnStatus, btag, decode_frame, decode_parameter_status};
use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest message the router accepts from a backend (Postgres's own limit is 1 GB).
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// What a pool needs to open connections to one node as one user.
#[derive(Clone, Debug)]
pub struct Login {
    /// Node name (for errors and metrics; never the address).
    pub node: String,
    /// `host:port`.
    pub addr: String,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
}

pub struct BackendConn {
    stream: TcpStream,
    /// Bytes read from the node and not yet consumed.
    pub rbuf: BytesMut,
    /// The node's pid and cancel key, so that a client's CancelRequest can reach it.
    pub pid: i32,
    pub secret: i32,
    pub addr: std::net::SocketAddr,
    /// Latest value of every parameter the node reported (ParameterStatus).
    pub reported: Vec<(String, String)>,
    /// Router-assigned ids of the statements prepared on this connection, each with
    /// the tick of its last use (see [`BackendConn::uses_prepared`]).
    pub prepared: HashMap<u64, u64>,
    /// Counts uses of prepared statements here: the order of `prepared`.
    pub use_tick: u64,
    /// The RowDescription of statements prepared here (by id), as this connection
    /// described them (a Describe of the statement, or of a portal with text results:
    /// the same message): a routed batch's Describe of such a portal is answered from
    /// it. A result type changed on the node since fails the Bind before it is used.
    pub described: std::collections::HashMap<u64, bytes::Bytes>,
    /// The promoted simple queries prepared here (id, name), least recently used
    /// first: at most `session::route::MAX_PROMOTED_PER_CONN`, the oldest closed when
    /// a new one is prepared.
    pub promoted: std::collections::VecDeque<(u64, bytes::Bytes)>,
    /// Fingerprint of the session settings applied here (0: none since RESET ALL).
    pub settings_fp: u64,
    /// Transaction status from the last ReadyForQuery.
    pub status: TxnStatus,
    pub created: Instant,
    pub last_used: Instant,
}

impl BackendConn {
    /// Whether statement `id` is prepared here; if so, this is a use of it (now the
    /// most recently used).
    pub fn uses_prepared(&mut self, id: u64) -> bool {
        match self.prepared.get_mut(&id) {
            Some(t) => {
                self.use_tick += 1;
                *t = self.use_tick;
                true
            }
            None => false,
        }
    }

    /// Statement `id` was prepared here (its ParseComplete came).
    pub fn add_prepared(&mut self, id: u64) {
        self.use_tick += 1;
        self.prepared.insert(id, self.use_tick);
    }

    /// With more than `max` client statements prepared here (promoted simple queries
    /// are bounded on their own and not counted), the least recently used ones, down
    /// to three quarters of `max` so that this runs seldom: forgotten here, to be
    /// closed on the node by the caller.
    pub fn evict_prepared(&mut self, max: usize) -> Vec<u64> {
        if max == 0 || self.prepared.len() <= max.saturating_add(self.promoted.len()) {
            return Vec::new();
        }
        let promoted: HashSet<u64> = self.promoted.iter().map(|(id, _)| *id).collect();
        let mut client: Vec<(u64, u64)> = self
            .prepared
            .iter()
            .filter(|(id, _)| !promoted.contains(id))
            .map(|(id, tick)| (*tick, *id))
            .collect();
        if client.len() <= max {
            return Vec::new();
        }
        let keep = max - max / 4;
        client.sort_unstable();
        let gone: Vec<u64> = client[..client.len() - keep]
            .iter()
            .map(|(_, id)| *id)
            .collect();
        for id in &gone {
            self.prepared.remove(id);
            self.described.remove(id);
        }
        gone
    }

    /// Opens and logs in. Cancel-safe: dropping the future drops the socket.
    pub async fn connect(login: &Login) -> Result<BackendConn, BackendError> {
        let fut = Self::connect_inner(login);
        match tokio::time::timeout(login.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::ConnectTimeout {
                node: login.node.clone(),
            }),
        }
    }

    async fn connect_inner(login: &Login) -> Result<BackendConn, BackendError> {
        let stream =
            TcpStream::connect(&login.addr)
                .await
                .map_err(|source| BackendError::Connect {
                    node: login.node.clone(),
                    source,
                })?;
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        let now = Instant::now();
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            pid: 0,
            secret: 0,
            addr,
            reported: Vec::new(),
            prepared: HashMap::new(),
            use_tick: 0,
            described: std::collections::HashMap::new(),
            promoted: std::collections::VecDeque::new(),
            settings_fp: 0,
            status: TxnStatus::Idle,
            created: now,
            last_used: now,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", login.user.as_str()),
                ("database", login.database.as_str()),
            ],
            &mut out,
        )?;
        conn.stream.write_all(&out).await?;
        conn.login(login).await?;
        Ok(conn)
    }

    async fn login(&mut self, login: &Login) -> Result<(), BackendError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                btag::AUTHENTICATION => {
                    let mut r = protocol::Reader::new(f.body());
                    let code = r.i32()?;
                    let mut out = BytesMut::new();
                    match code {
                        protocol::auth_code::OK => continue,
                        protocol::auth_code::CLEARTEXT => {
                            let pw = password(login)?;
                            frontend::password_message(pw.as_bytes(), &mut out)?;
                        }
                        protocol::auth_code::MD5 => {
                            let pw = password(login)?;
                            let salt: [u8; 4] = r.bytes(4)?.try_into().expect("4 bytes");
                            let hash = match stored_md5(pw) {
                                // Postgres's stored form md5(password || user): finish it.
                                Some(inner) => {
                                    let mut v = inner.as_bytes().to_vec();
                                    v.extend_from_slice(&salt);
                                    format!("md5{:x}", md5::compute(&v))
                                }
                                None => md5_hash(login.user.as_bytes(), pw.as_bytes(), salt),
                            };
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        protocol::auth_code::SASL => {
                            let mut offered = false;
                            while let Ok(m) = r.cstr() {
                                if m.is_empty() {
                                    break;
                                }
                                offered |= m == SCRAM_SHA_256.as_bytes();
                            }
                            if !offered {
                                return Err(BackendError::UnsupportedAuth {
                                    node: login.node.clone(),
                                    method: "SASL without SCRAM-SHA-256".into(),
                                });
                            }
                            let pw = password(login)?;
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                            scram = Some(s);
                        }
                        protocol::auth_code::SASL_CONTINUE => {
                            let s = scram
                                .as_mut()
                                .ok_or(BackendError::Desync("SASL continue"))?;
                            s.update(r.remaining())?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        protocol::auth_code::SASL_FINAL => {
                            let s = scram.as_mut().ok_or(BackendError::Desync("SASL final"))?;
                            s.finish(r.remaining())?;
                            continue;
                        }
                        other => {
                            return Err(BackendError::UnsupportedAuth {
                                node: login.node.clone(),
                                method: format!("authentication request {other}"),
                            });
                        }
                    }
                    self.stream.write_all(&out).await?;
                }
                btag::PARAMETER_STATUS => self.note_parameter(f.body())?,
                btag::BACKEND_KEY_DATA => {
                    let mut r = protocol::Reader::new(f.body());
                    self.pid = r.i32()?;
                    self.secret = r.i32()?;
                }
                btag::NOTICE_RESPONSE | btag::NEGOTIATE_PROTOCOL_VERSION => {}
                btag::ERROR_RESPONSE => return Err(BackendError::Rejected(f)),
                btag::READY_FOR_QUERY => return Ok(()),
                _ => return Err(BackendError::Desync("unexpected message during startup")),
            }
        }
    }

    /// Records a ParameterStatus the node sent.
    pub fn note_parameter(&mut self, body: &[u8]) -> Result<(), BackendError> {
        let (name, value) = decode_parameter_status(body)?;
        match self.reported.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.reported.push((name, value)),
        }
        Ok(())
    }

    /// Reads one whole message. Cancel-safe: bytes already read stay in `rbuf`.
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, MAX_BACKEND_MESSAGE)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes into `rbuf`. Cancel-safe.
    pub async fn fill(&mut self) -> Result<usize, BackendError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(16 * 1024);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(BackendError::Closed);
        }
        Ok(n)
    }

    /// Writes all of `buf`. Not cancel-safe: a partial write leaves the connection
    /// unusable, so callers that drop this future must discard the connection.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(buf).await?;
        Ok(())
    }

    /// Runs a statement of the router's own (simple protocol) and swallows its
    /// answers, keeping ParameterStatus. An error comes back as `Statement`.
    pub async fn run_internal(&mut self, sql: &str) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        protocol::encode_simple_query(&mut out, sql);
        self.write_all(&out).await?;
        let mut failed = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                btag::PARAMETER_STATUS => self.note_parameter(f.body())?,
                btag::ERROR_RESPONSE => failed = Some(f),
                btag::READY_FOR_QUERY => {
                    self.status = TxnStatus::from_byte(*f.body().first().unwrap_or(&0))?;
                    return match failed {
                        Some(f) => Err(BackendError::Statement(f)),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }

    /// Runs a simple query and keeps its answers (every message up to, not including,
    /// ReadyForQuery, raw) for the router to pass on or drop. ParameterStatus is noted
    /// and kept too. An ErrorResponse comes back as `Statement`.
    pub async fn run_capture(&mut self, sql: &str) -> Result<BytesMut, BackendError> {
        let mut out = BytesMut::new();
        protocol::encode_simple_query(&mut out, sql);
        match self.run_capture_raw(&out).await? {
            (out, None) => Ok(out),
            (_, Some(f)) => Err(BackendError::Statement(f)),
        }
    }

    /// Sends `messages` (ending with a Sync, or a simple Query) and keeps the answers up
    /// to ReadyForQuery: the messages before any ErrorResponse, and the ErrorResponse
    /// itself apart.
    pub async fn run_capture_raw(
        &mut self,
        messages: &[u8],
    ) -> Result<(BytesMut, Option<Frame>), BackendError> {
        self.write_all(messages).await?;
        let mut out = BytesMut::new();
        let mut failed = None;
        while let Some(f) = self.next_answer(&mut failed).await? {
            out.extend_from_slice(&f.raw);
        }
        Ok((out, failed))
    }

    /// The next message of an answer that ends with ReadyForQuery (`None` then, the
    /// status noted): ParameterStatus is noted and not returned, an ErrorResponse is
    /// put in `failed` and what follows it up to ReadyForQuery is dropped.
    pub async fn next_answer(
        &mut self,
        failed: &mut Option<Frame>,
    ) -> Result<Option<Frame>, BackendError> {
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                btag::PARAMETER_STATUS => self.note_parameter(f.body())?,
                btag::ERROR_RESPONSE => *failed = Some(f),
                btag::READY_FOR_QUERY => {
                    self.status = TxnStatus::from_byte(*f.body().first().unwrap_or(&0))?;
                    return Ok(None);
                }
                _ if failed.is_some() => {}
                _ => return Ok(Some(f)),
            }
        }
    }

    /// True when the idle connection looks usable: nothing unread, not closed by the
    /// node (a terminated backend sends FATAL and closes while it sits in the pool).
    pub fn idle_healthy(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.stream.try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// Sends Terminate and closes, best effort.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.stream.write_all(&out)).await;
    }
}

/// The hex part of a password given in Postgres's stored md5 form (`md5` + 32 hex).
pub fn stored_md5(password: &str) -> Option<&str> {
    let hex = password.strip_prefix("md5")?;
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn password(login: &Login) -> Result<&str, BackendError> {
    login
        .password
        .as_deref()
        .ok_or_else(|| BackendError::MissingPassword {
            node: login.node.clone(),
            user: login.user.clone(),
        })
}

/// Sends a CancelRequest for (pid, secret) to the node at `addr`.
pub async fn cancel_backend(
    addr: std::net::SocketAddr,
    pid: i32,
    secret: i32,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    s.write_all(&out).await?;
    // Postgres closes the socket once it has read the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}
