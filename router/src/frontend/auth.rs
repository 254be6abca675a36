//! Client authentication: SCRAM-SHA-256 (pgwire's server-side SCRAM state machine),
//! md5, or trust when the config says so.

use super::{AuthError, read_frame};
use crate::config::{AuthMethod, Config, ScramCreds};
use crate::error::RouterError;
use crate::protocol::{self, Reader, auth_code, encode_auth, encode_auth_sasl, tag};
use bytes::BytesMut;
use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth};
use pgwire::error::PgWireError;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Authentication messages are small; Postgres caps them similarly.
const MAX_AUTH_MESSAGE: usize = 10_000;

pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    cfg: &Config,
    user: &str,
    channel_binding: Option<&ScramServerAuth>,
) -> Result<(), RouterError> {
    let failed = || {
        RouterError::Auth(AuthError::PasswordFailed {
            user: user.to_owned(),
        })
    };
    let known = cfg.user(user);
    match cfg.auth_method {
        AuthMethod::Trust => {
            if known.is_none() {
                return Err(failed());
            }
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            let mut out = BytesMut::new();
            encode_auth(&mut out, auth_code::MD5, &salt);
            write(stream, &out).await?;
            let f = read_password(stream, rbuf).await?;
            let mut r = Reader::new(f.body());
            let answer = r.cstr().map_err(|e| AuthError::Malformed(e.to_string()))?;
            let Some(pw) = known.and_then(|u| u.password.as_deref()) else {
                return Err(failed());
            };
            let expected = md5_response(user, pw, &salt);
            if !constant_time_eq(answer, expected.as_bytes()) {
                return Err(failed());
            }
        }
        AuthMethod::ScramSha256 => {
            // An unknown user goes through the same exchange with a secret nobody can
            // match, so that the answers do not tell which users exist (as Postgres).
            let creds = known
                .and_then(|u| u.scram.clone())
                .unwrap_or_else(|| mock_creds(user));
            scram(stream, rbuf, creds, user, channel_binding).await?;
        }
    }
    let mut out = BytesMut::new();
    encode_auth(&mut out, auth_code::OK, &[]);
    write(stream, &out).await
}

async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    creds: ScramCreds,
    user: &str,
    channel_binding: Option<&ScramServerAuth>,
) -> Result<(), RouterError> {
    // Over TLS, SCRAM-SHA-256-PLUS binds the exchange to the router's certificate
    // (tls-server-end-point), as Postgres offers it.
    let mut out = BytesMut::new();
    if channel_binding.is_some() {
        encode_auth_sasl(&mut out, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    } else {
        encode_auth_sasl(&mut out, &["SCRAM-SHA-256"]);
    }
    write(stream, &out).await?;

    let f = read_password(stream, rbuf).await?;
    let mut r = Reader::new(f.body());
    let mechanism = r.cstr().map_err(|e| AuthError::Malformed(e.to_string()))?;
    let plus = match mechanism {
        b"SCRAM-SHA-256" => false,
        b"SCRAM-SHA-256-PLUS" if channel_binding.is_some() => true,
        _ => return Err(AuthError::UnsupportedMechanism.into()),
    };
    let len = r.i32().map_err(|e| AuthError::Malformed(e.to_string()))?;
    let data = r.remaining();
    if len < 0 || len as usize != data.len() {
        return Err(AuthError::Malformed("SASLInitialResponse length".into()).into());
    }
    // The mechanism and the GS2 channel-binding flag must agree (RFC 5802).
    if plus != data.starts_with(b"p=") {
        return Err(AuthError::Malformed(
            "channel binding flag does not match the mechanism".into(),
        )
        .into());
    }
    let secret = match creds {
        ScramCreds::Salted {
            salt,
            salted_password,
        } => ScramSecret::SaltedPassword {
            salt,
            salted_password,
        },
        ScramCreds::Verifier {
            salt,
            iterations,
            stored_key,
            server_key,
        } => ScramSecret::Verifier {
            salt,
            iterations,
            stored_key,
            server_key,
        },
    };
    let plain = ScramServerAuth::new();
    let (server_first, waiting) = channel_binding
        .unwrap_or(&plain)
        .on_client_first_message_with_secret(data, secret)
        .map_err(|e| AuthError::Malformed(e.to_string()))?;
    out.clear();
    encode_auth(&mut out, auth_code::SASL_CONTINUE, server_first.as_bytes());
    write(stream, &out).await?;

    let f = read_password(stream, rbuf).await?;
    match waiting.on_client_final_message(f.body()) {
        Ok(server_final) => {
            out.clear();
            encode_auth(&mut out, auth_code::SASL_FINAL, server_final.as_bytes());
            write(stream, &out).await
        }
        Err(PgWireError::InvalidPassword(_)) => Err(AuthError::PasswordFailed {
            user: user.to_owned(),
        }
        .into()),
        Err(e) => Err(AuthError::Malformed(e.to_string()).into()),
    }
}

async fn read_password<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Result<protocol::Frame, RouterError> {
    let f = read_frame(stream, rbuf, MAX_AUTH_MESSAGE).await?;
    if f.tag != tag::PASSWORD {
        return Err(AuthError::Malformed(format!(
            "expected a password message, got message type 0x{:02x}",
            f.tag
        ))
        .into());
    }
    Ok(f)
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, buf: &[u8]) -> Result<(), RouterError> {
    stream.write_all(buf).await.map_err(RouterError::ClientIo)?;
    stream.flush().await.map_err(RouterError::ClientIo)
}

/// What a client must answer to an md5 challenge. The configured password may be the
/// plaintext or Postgres's stored form `md5<md5(password || user)>`.
fn md5_response(user: &str, password: &str, salt: &[u8; 4]) -> String {
    if let Some(hex) = crate::backend::stored_md5(password) {
        let mut inner = hex.as_bytes().to_vec();
        inner.extend_from_slice(salt);
        return format!("md5{:x}", md5::compute(&inner));
    }
    pgwire::api::auth::md5pass::hash_md5_password(user, password, salt)
}

/// SCRAM material for a user that does not exist: a salt that is stable per user name
/// (a probe sees the same salt each time, as for a real user) and a random key.
fn mock_creds(user: &str) -> ScramCreds {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let seed = SEED.get_or_init(std::collections::hash_map::RandomState::new);
    let mut salt = Vec::with_capacity(16);
    for i in 0..2u8 {
        let mut h = seed.build_hasher();
        h.write(user.as_bytes());
        h.write_u8(i);
        salt.extend_from_slice(&h.finish().to_le_bytes());
    }
    ScramCreds::Salted {
        salt,
        salted_password: rand::random::<[u8; 32]>().to_vec(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
