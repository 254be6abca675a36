//! Messages a server sends: tags, the few the router writes itself, and the fields it
//! reads from the backend's (transaction status, SQLSTATE, command tag, parameters).

use super::frontend::put_cstr;
use super::{ProtocolError, Reader};
use bytes::{BufMut, BytesMut};

/// Backend message tags.
pub mod btag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Authentication request codes (`R` messages).
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxnStatus {
    pub fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            b'I' => Ok(TxnStatus::Idle),
            b'T' => Ok(TxnStatus::InTransaction),
            b'E' => Ok(TxnStatus::Failed),
            _ => Err(ProtocolError::Malformed("bad ReadyForQuery status")),
        }
    }
    pub fn byte(self) -> u8 {
        match self {
            TxnStatus::Idle => b'I',
            TxnStatus::InTransaction => b'T',
            TxnStatus::Failed => b'E',
        }
    }
}

fn put_header(buf: &mut BytesMut, tag: u8, body_len: usize) {
    buf.reserve(body_len + 5);
    buf.put_u8(tag);
    buf.put_i32((body_len + 4) as i32);
}

pub fn encode_auth(buf: &mut BytesMut, code: i32, data: &[u8]) {
    put_header(buf, btag::AUTHENTICATION, 4 + data.len());
    buf.put_i32(code);
    buf.put_slice(data);
}

pub fn encode_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let mut data = BytesMut::new();
    for m in mechanisms {
        put_cstr(&mut data, m.as_bytes());
    }
    data.put_u8(0);
    encode_auth(buf, auth_code::SASL, &data);
}

pub fn encode_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_header(buf, btag::PARAMETER_STATUS, name.len() + value.len() + 2);
    put_cstr(buf, name.as_bytes());
    put_cstr(buf, value.as_bytes());
}

pub fn encode_backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_header(buf, btag::BACKEND_KEY_DATA, 8);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

pub fn encode_ready_for_query(buf: &mut BytesMut, status: TxnStatus) {
    put_header(buf, btag::READY_FOR_QUERY, 1);
    buf.put_u8(status.byte());
}

pub fn encode_command_complete(buf: &mut BytesMut, tag: &str) {
    put_header(buf, btag::COMMAND_COMPLETE, tag.len() + 1);
    buf.put_slice(tag.as_bytes());
    buf.put_u8(0);
}

pub fn encode_parse_complete(buf: &mut BytesMut) {
    put_header(buf, btag::PARSE_COMPLETE, 0);
}

pub fn encode_close_complete(buf: &mut BytesMut) {
    put_header(buf, btag::CLOSE_COMPLETE, 0);
}

pub fn encode_negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unknown: &[String]) {
    let mut body = BytesMut::new();
    body.put_i32(minor);
    body.put_i32(unknown.len() as i32);
    for o in unknown {
        put_cstr(&mut body, o.as_bytes());
    }
    put_header(buf, btag::NEGOTIATE_PROTOCOL_VERSION, body.len());
    buf.put_slice(&body);
}

/// ErrorResponse or NoticeResponse from (field code, value) pairs.
/// <https://www.postgresql.org/docs/current/protocol-error-fields.html>
pub fn encode_error_fields(buf: &mut BytesMut, tag: u8, fields: &[(u8, &str)]) {
    let body_len: usize = fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1;
    put_header(buf, tag, body_len);
    for (code, value) in fields {
        buf.put_u8(*code);
        put_cstr(buf, value.as_bytes());
    }
    buf.put_u8(0);
}

/// The SQLSTATE (`C` field) of an ErrorResponse/NoticeResponse body.
pub fn error_sqlstate(body: &[u8]) -> Option<&[u8]> {
    error_field(body, b'C')
}

/// One field of an ErrorResponse/NoticeResponse body.
pub fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut r = Reader::new(body);
    loop {
        let c = r.u8().ok()?;
        if c == 0 {
            return None;
        }
        let v = r.cstr().ok()?;
        if c == code {
            return Some(v);
        }
    }
}

/// An ErrorResponse / NoticeResponse frame (tag and length included) with the fields
/// of `code` left out; `None` if the body is malformed or has no such field.
pub fn error_without_field(tag: u8, body: &[u8], code: u8) -> Option<Vec<u8>> {
    error_field(body, code)?;
    let mut kept = Vec::with_capacity(body.len());
    let mut r = Reader::new(body);
    loop {
        let c = r.u8().ok()?;
        if c == 0 {
            break;
        }
        let v = r.cstr().ok()?;
        if c != code {
            kept.push(c);
            kept.extend_from_slice(v);
            kept.push(0);
        }
    }
    kept.push(0);
    let mut out = Vec::with_capacity(kept.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((kept.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&kept);
    Some(out)
}

/// ParameterStatus body -> (name, value).
pub fn decode_parameter_status(body: &[u8]) -> Result<(String, String), ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.cstr_utf8()?.to_owned();
    let value = r.cstr_utf8()?.to_owned();
    Ok((name, value))
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_error_field_is_left_out() {
        let body = b"SERROR\0C42601\0Msyntax error\0P12\0\0";
        let f = super::error_without_field(b'E', body, b'P').unwrap();
        assert_eq!(&f[5..], b"SERROR\0C42601\0Msyntax error\0\0");
        assert_eq!(
            i32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 1
        );
        assert_eq!(f[0], b'E');
        assert!(super::error_without_field(b'E', body, b'W').is_none());
        assert!(super::error_without_field(b'E', b"SERROR", b'P').is_none());
    }
    use super::*;
    use crate::protocol::decode_frame;

    #[test]
    fn error_round_trip() {
        let mut b = BytesMut::new();
        encode_error_fields(
            &mut b,
            btag::ERROR_RESPONSE,
            &[(b'S', "ERROR"), (b'C', "08P01"), (b'M', "bad")],
        );
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        assert_eq!(error_sqlstate(f.body()), Some(&b"08P01"[..]));
        assert_eq!(error_field(f.body(), b'M'), Some(&b"bad"[..]));
        assert_eq!(error_field(f.body(), b'D'), None);
    }

    #[test]
    fn startup_answers_round_trip() {
        let mut b = BytesMut::new();
        encode_auth_sasl(&mut b, &["SCRAM-SHA-256"]);
        encode_auth(&mut b, auth_code::MD5, &[1, 2, 3, 4]);
        encode_backend_key_data(&mut b, 77, -5);
        encode_negotiate_protocol_version(&mut b, 0, &["_pq_.x".to_string()]);
        encode_parse_complete(&mut b);
        encode_close_complete(&mut b);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let mut r = Reader::new(f.body());
        assert_eq!(r.i32().unwrap(), auth_code::SASL);
        assert_eq!(r.cstr().unwrap(), b"SCRAM-SHA-256");
        assert_eq!(r.cstr().unwrap(), b"");
        assert!(r.is_empty());
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.body(), &[0, 0, 0, 5, 1, 2, 3, 4]);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let mut r = Reader::new(f.body());
        assert_eq!((f.tag, r.i32().unwrap(), r.i32().unwrap()), (b'K', 77, -5));
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let mut r = Reader::new(f.body());
        assert_eq!((r.i32().unwrap(), r.i32().unwrap()), (0, 1));
        assert_eq!(r.cstr().unwrap(), b"_pq_.x");
        for want in [btag::PARSE_COMPLETE, btag::CLOSE_COMPLETE] {
            let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
            assert_eq!((f.tag, f.body().len()), (want, 0));
        }
        assert!(b.is_empty());
    }

    #[test]
    fn status_round_trip() {
        let mut b = BytesMut::new();
        encode_parameter_status(&mut b, "TimeZone", "UTC");
        encode_ready_for_query(&mut b, TxnStatus::InTransaction);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(
            decode_parameter_status(f.body()).unwrap(),
            ("TimeZone".into(), "UTC".into())
        );
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(
            TxnStatus::from_byte(f.body()[0]).unwrap(),
            TxnStatus::InTransaction
        );
    }
}
