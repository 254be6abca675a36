//! Postgres wire messages written byte by byte, and a reader of backend messages: a
//! client that sends exactly the bytes a test means (bad input, pipelined requests in one
//! write).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read may wait before the router is considered hung.
pub const HANG: Duration = Duration::from_secs(15);

pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.put_u8(tag);
    v.put_i32(body.len() as i32 + 4);
    v.put_slice(body);
    v
}

fn cstr(v: &mut Vec<u8>, s: &[u8]) {
    v.put_slice(s);
    v.put_u8(0);
}

/// StartupMessage with an explicit protocol version (3.0 = 196608).
pub fn startup_version(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_i32(version);
    for (k, v) in params {
        cstr(&mut body, k.as_bytes());
        cstr(&mut body, v.as_bytes());
    }
    body.put_u8(0);
    let mut out = Vec::new();
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
    out
}

pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    startup_version(196608, params)
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql.as_bytes());
    msg(b'Q', &b)
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name.as_bytes());
    cstr(&mut b, sql.as_bytes());
    b.put_i16(types.len() as i16);
    for t in types {
        b.put_u32(*t);
    }
    msg(b'P', &b)
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal.as_bytes());
    cstr(&mut b, stmt.as_bytes());
    b.put_i16(0); // parameter formats: all text
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
    b.put_i16(0); // result formats: all text
    msg(b'B', &b)
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name.as_bytes());
    msg(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal.as_bytes());
    b.put_i32(max_rows);
    msg(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    msg(b'c', &[])
}

pub fn copy_fail(why: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, why.as_bytes());
    msg(b'f', &b)
}

pub fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// One backend message.
#[derive(Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tag == b'E' || self.tag == b'N' {
            write!(
                f,
                "{}({} {})",
                self.tag as char,
                self.field(b'C').unwrap_or_default(),
                self.field(b'M').unwrap_or_default()
            )
        } else {
            write!(f, "{}({}B)", self.tag as char, self.body.len())
        }
    }
}

impl Msg {
    /// A field of an ErrorResponse/NoticeResponse ('C' SQLSTATE, 'M' message...).
    pub fn field(&self, code: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&c, rest)) = b.split_first() {
            if c == 0 {
                break;
            }
            let end = rest.iter().position(|&x| x == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }

    pub fn sqlstate(&self) -> String {
        assert_eq!(self.tag, b'E', "not an ErrorResponse: {self:?}");
        self.field(b'C').unwrap_or_default()
    }

    /// Text columns of a DataRow.
    pub fn row(&self) -> Vec<Option<String>> {
        assert_eq!(self.tag, b'D');
        let mut b = &self.body[..];
        let n = b.get_i16();
        (0..n)
            .map(|_| {
                let len = b.get_i32();
                if len < 0 {
                    None
                } else {
                    let v = String::from_utf8_lossy(&b[..len as usize]).into_owned();
                    b.advance(len as usize);
                    Some(v)
                }
            })
            .collect()
    }
}

/// What a read ended with.
#[derive(Debug)]
pub enum Read {
    Msg(Msg),
    /// The router closed the connection (EOF or reset).
    Closed,
}

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the router");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connected and logged in as `postgres` to `db`: ReadyForQuery was read.
    pub async fn login(port: u16, db: &str) -> Raw {
        let mut r = Raw::connect(port).await;
        r.send(&startup(&[("user", "postgres"), ("database", db)]))
            .await;
        let msgs = r.until_ready().await;
        assert!(
            msgs.iter()
                .any(|m| m.tag == b'R' && m.body[..] == [0, 0, 0, 0]),
            "no AuthenticationOk: {msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.tag == b'K'),
            "no BackendKeyData: {msgs:?}"
        );
        r
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to router");
    }

    /// Writes, ignoring errors (the router may have closed already).
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next backend message, or Closed. Panics when nothing comes within HANG.
    pub async fn read(&mut self) -> Read {
        match tokio::time::timeout(HANG, self.read_inner()).await {
            Ok(r) => r,
            Err(_) => panic!("router hung: nothing within {HANG:?}"),
        }
    }

    async fn read_inner(&mut self) -> Read {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                assert!(len >= 4, "bad length {len} from the router");
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let mut m = self.buf.split_to(total);
                    let tag = m[0];
                    m.advance(5);
                    return Read::Msg(Msg {
                        tag,
                        body: m.freeze(),
                    });
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            }
        }
    }

    /// The next message; panics on close.
    pub async fn next(&mut self) -> Msg {
        match self.read().await {
            Read::Msg(m) => m,
            Read::Closed => panic!("router closed the connection unexpectedly"),
        }
    }

    /// Messages up to and including ReadyForQuery. Panics on close or hang.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            match self.read().await {
                Read::Msg(m) => {
                    let done = m.tag == b'Z';
                    out.push(m);
                    if done {
                        return out;
                    }
                }
                Read::Closed => panic!("closed before ReadyForQuery; got {out:?}"),
            }
        }
    }

    /// Messages until the router closes the connection (panics on hang).
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            match self.read().await {
                Read::Msg(m) => out.push(m),
                Read::Closed => return out,
            }
        }
    }

    /// Runs one simple query and returns its messages up to ReadyForQuery.
    pub async fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql)).await;
        self.until_ready().await
    }

    /// Closes with a TCP reset instead of a FIN: the most abrupt goodbye.
    #[allow(deprecated)] // a zero linger does not block: the kernel sends RST at once
    pub fn reset(self) {
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }
}

/// The ErrorResponses among `msgs`.
pub fn errors(msgs: &[Msg]) -> Vec<&Msg> {
    msgs.iter().filter(|m| m.tag == b'E').collect()
}

/// The DataRows among `msgs`, as text.
pub fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| m.row())
        .collect()
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
