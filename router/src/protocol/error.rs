//! Errors in bytes that arrive on a socket.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    InvalidLength(i32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("invalid UTF-8 in message")]
    InvalidUtf8,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("unexpected message type 0x{0:02x}")]
    UnexpectedMessage(u8),
}
