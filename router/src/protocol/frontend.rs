//! Messages a client sends: the fields the router reads (statement names, query text)
//! and re-encoding with another statement name. Everything else passes through raw.

use super::{ProtocolError, Reader};
use bytes::{BufMut, BytesMut};

/// Frontend message tags.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PASSWORD: u8 = b'p';
}

/// Parse: statement name, query text, and the parameter types left as raw bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

pub fn decode_parse(body: &[u8]) -> Result<ParseMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.cstr()?;
    let query = r.cstr()?;
    let rest = r.remaining();
    let mut check = Reader::new(rest);
    let n = check.i16()?;
    if n < 0 || check.remaining().len() != n as usize * 4 {
        return Err(ProtocolError::Malformed("bad parameter type list in Parse"));
    }
    Ok(ParseMsg {
        name,
        query,
        param_types: rest,
    })
}

pub fn encode_parse(buf: &mut BytesMut, name: &[u8], query: &[u8], param_types: &[u8]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + param_types.len();
    buf.reserve(len + 1);
    buf.put_u8(tag::PARSE);
    buf.put_i32(len as i32);
    put_cstr(buf, name);
    put_cstr(buf, query);
    buf.put_slice(param_types);
}

/// Bind: portal and statement names; the rest (formats, values, result formats) raw.
#[derive(Debug, PartialEq, Eq)]
pub struct BindMsg<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

pub fn decode_bind(body: &[u8]) -> Result<BindMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    Ok(BindMsg {
        portal,
        statement,
        rest: r.remaining(),
    })
}

pub fn encode_bind(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest.len();
    buf.reserve(len + 1);
    buf.put_u8(tag::BIND);
    buf.put_i32(len as i32);
    put_cstr(buf, portal);
    put_cstr(buf, statement);
    buf.put_slice(rest);
}

/// Describe and Close name either a statement (`S`) or a portal (`P`).
pub fn decode_target(body: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(
            "Describe/Close target must be 'S' or 'P'",
        ));
    }
    let name = r.cstr()?;
    if !r.is_empty() {
        return Err(ProtocolError::Malformed(
            "trailing bytes after Describe/Close",
        ));
    }
    Ok((kind, name))
}

pub fn encode_target(buf: &mut BytesMut, msg_tag: u8, kind: u8, name: &[u8]) {
    buf.put_u8(msg_tag);
    buf.put_i32((4 + 1 + name.len() + 1) as i32);
    buf.put_u8(kind);
    put_cstr(buf, name);
}

pub fn encode_simple_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(tag::QUERY);
    buf.put_i32((4 + sql.len() + 1) as i32);
    put_cstr(buf, sql.as_bytes());
}

pub fn encode_execute(buf: &mut BytesMut, portal: &[u8], max_rows: i32) {
    buf.put_u8(tag::EXECUTE);
    buf.put_i32((4 + portal.len() + 1 + 4) as i32);
    put_cstr(buf, portal);
    buf.put_i32(max_rows);
}

pub fn encode_sync(buf: &mut BytesMut) {
    buf.put_u8(tag::SYNC);
    buf.put_i32(4);
}

pub fn encode_flush(buf: &mut BytesMut) {
    buf.put_u8(tag::FLUSH);
    buf.put_i32(4);
}

pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_frame;

    #[test]
    fn parse_round_trip() {
        let mut b = BytesMut::new();
        encode_parse(&mut b, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let p = decode_parse(f.body()).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        assert_eq!(p.param_types, &[0, 1, 0, 0, 0, 23]);
        // Count says 2 types but only one follows.
        let mut b = BytesMut::new();
        encode_parse(&mut b, b"s1", b"q", &[0, 2, 0, 0, 0, 23]);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert!(decode_parse(f.body()).is_err());
    }

    #[test]
    fn bind_round_trip() {
        let mut b = BytesMut::new();
        encode_bind(&mut b, b"", b"stmt", &[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let m = decode_bind(f.body()).unwrap();
        assert_eq!(m.portal, b"");
        assert_eq!(m.statement, b"stmt");
        assert_eq!(m.rest.len(), 11);
        assert!(decode_bind(b"no terminator").is_err());
    }

    #[test]
    fn target_round_trip() {
        let mut b = BytesMut::new();
        encode_target(&mut b, tag::DESCRIBE, b'S', b"x");
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(decode_target(f.body()).unwrap(), (b'S', &b"x"[..]));
        assert!(decode_target(b"Qx\0").is_err());
        assert!(decode_target(b"Sx\0junk").is_err());
    }
}
