//! The Postgres wire protocol as bytes: framing, the few fields the router reads, and the
//! messages it writes itself. No I/O here: decoders take a buffer and return `Ok(None)`
//! when they need more bytes ("need more" is not an error; bad bytes are).
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>

mod backend;
mod error;
mod frontend;
mod startup;

pub use backend::*;
pub use error::ProtocolError;
pub use frontend::*;
pub use startup::{StartupPacket, decode_startup};

use bytes::{Buf, Bytes, BytesMut};

/// Length of a regular message header: one tag byte and a 4-byte length.
pub const HEADER_LEN: usize = 5;

/// One complete regular message, kept as the raw bytes that arrived (tag and length
/// included) so that it can be forwarded without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body, after the tag and the length.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef {
            tag: self.tag,
            raw: &self.raw,
        }
    }
}

/// A complete message seen in place in a read buffer (no copy, no reference count).
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub tag: u8,
    pub raw: &'a [u8],
}

impl<'a> FrameRef<'a> {
    pub fn body(&self) -> &'a [u8] {
        &self.raw[HEADER_LEN..]
    }
}

/// Reads the header of the message at the start of `buf`: `(tag, total length including
/// the tag byte)`. `Ok(None)` when fewer than 5 bytes are buffered.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::InvalidLength(len));
    }
    let len = len as usize;
    if len > max_len {
        return Err(ProtocolError::MessageTooLarge { len, max: max_len });
    }
    Ok(Some((tag, len + 1)))
}

/// Splits one complete message off the front of `buf`.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match peek_header(buf, max_len)? {
        Some((tag, total)) if buf.len() >= total => {
            let raw = buf.split_to(total).freeze();
            Ok(Some(Frame { tag, raw }))
        }
        Some((_, total)) => {
            // Make room for the whole message at once instead of growing piecemeal.
            buf.reserve(total - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// A cursor over a message body that reads the protocol's primitive types.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A NUL-terminated string, returned without its terminator.
    pub fn cstr(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Malformed("missing string terminator"))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn cstr_utf8(&mut self) -> Result<&'a str, ProtocolError> {
        std::str::from_utf8(self.cstr()?).map_err(|_| ProtocolError::InvalidUtf8)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        if self.buf.is_empty() {
            return Err(ProtocolError::Malformed("message too short"));
        }
        let v = self.buf[0];
        self.buf = &self.buf[1..];
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        if self.buf.len() < 2 {
            return Err(ProtocolError::Malformed("message too short"));
        }
        let v = (&self.buf[..2]).get_i16();
        self.buf = &self.buf[2..];
        Ok(v)
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        if self.buf.len() < 4 {
            return Err(ProtocolError::Malformed("message too short"));
        }
        let v = (&self.buf[..4]).get_i32();
        self.buf = &self.buf[4..];
        Ok(v)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed("message too short"));
        }
        let v = &self.buf[..n];
        self.buf = &self.buf[n..];
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_needs_more_then_splits() {
        let mut msg = BytesMut::new();
        encode_simple_query(&mut msg, "select 1");
        let full = msg.clone();
        let mut partial = BytesMut::from(&full[..3]);
        assert_eq!(decode_frame(&mut partial, 1 << 20).unwrap(), None);
        partial.extend_from_slice(&full[3..full.len() - 1]);
        assert_eq!(decode_frame(&mut partial, 1 << 20).unwrap(), None);
        partial.extend_from_slice(&full[full.len() - 1..]);
        let f = decode_frame(&mut partial, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert!(partial.is_empty());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut b = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert!(matches!(
            decode_frame(&mut b, 100),
            Err(ProtocolError::InvalidLength(2))
        ));
        let mut b = BytesMut::from(&[b'Q', 0x7f, 0, 0, 0][..]);
        assert!(matches!(
            decode_frame(&mut b, 100),
            Err(ProtocolError::MessageTooLarge { .. })
        ));
        let mut b = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(decode_frame(&mut b, 100).is_err());
    }
}
