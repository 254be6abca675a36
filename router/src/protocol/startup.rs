//! The untagged packets a client may send first: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use super::{ProtocolError, Reader};
use bytes::{Buf, BytesMut};

/// Postgres refuses startup packets above this size; so do we.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST_CODE: i32 = 80877103;
const GSSENC_REQUEST_CODE: i32 = 80877104;
const CANCEL_REQUEST_CODE: i32 = 80877102;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        /// Protocol minor version asked for; we speak 3.0 and negotiate down.
        minor: u16,
        /// Parameters in the order sent (`user`, `database`, `options`, GUCs, and
        /// `_pq_.` protocol options).
        params: Vec<(String, String)>,
    },
}

pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::InvalidLength(len));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::MessageTooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    let mut r = Reader::new(&packet);
    let out = match code {
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let pid = r.i32()?;
            let secret = r.i32()?;
            StartupPacket::Cancel { pid, secret }
        }
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let name = r.cstr_utf8()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr_utf8()?;
                params.push((name.to_owned(), value.to_owned()));
            }
            StartupPacket::Startup { minor, params }
        }
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn startup(params: &[(&str, &str)], version: i32) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_i32(version);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(&body);
        out
    }

    #[test]
    fn round_trip_startup() {
        let mut b = startup(&[("user", "alice"), ("database", "db")], 196608);
        let full = b.clone();
        let mut part = BytesMut::from(&full[..10]);
        assert_eq!(decode_startup(&mut part).unwrap(), None);
        match decode_startup(&mut b).unwrap().unwrap() {
            StartupPacket::Startup { minor, params } => {
                assert_eq!(minor, 0);
                assert_eq!(params[0], ("user".into(), "alice".into()));
                assert_eq!(params[1], ("database".into(), "db".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ssl_and_cancel() {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(SSL_REQUEST_CODE);
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut b = BytesMut::new();
        b.put_i32(16);
        b.put_i32(CANCEL_REQUEST_CODE);
        b.put_i32(42);
        b.put_i32(-7);
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 42,
                secret: -7
            })
        );
    }

    #[test]
    fn bad_packets() {
        let mut b = startup(&[("user", "a")], 2 << 16);
        assert!(matches!(
            decode_startup(&mut b),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let mut b = BytesMut::new();
        b.put_i32(1_000_000);
        b.put_i32(196608);
        assert!(decode_startup(&mut b).is_err());
        // Unterminated parameter list.
        let mut b = BytesMut::new();
        b.put_i32(13);
        b.put_i32(196608);
        b.put_slice(b"user\0");
        assert!(decode_startup(&mut b).is_err());
    }
}
