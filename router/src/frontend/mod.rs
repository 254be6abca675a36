//! The client side of the wire: TLS negotiation, startup, authentication, cancel
//! requests; then the connection is handed to a `Session`.

mod auth;
mod cancel;
mod error;
mod startup;
mod tls;

pub use cancel::{CancelRegistry, CancelSlot};
pub use error::AuthError;
pub use startup::{handle_connection, reject as reject_early};
pub use tls::load_tls;

use crate::error::RouterError;
use crate::protocol::{Frame, decode_frame};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads one whole regular message from the client. Cancel-safe (bytes stay in `buf`).
pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, RouterError> {
    loop {
        if let Some(f) = decode_frame(buf, max)? {
            return Ok(f);
        }
        if stream.read_buf(buf).await.map_err(RouterError::ClientIo)? == 0 {
            return Err(RouterError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
}
