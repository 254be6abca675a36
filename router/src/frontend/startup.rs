//! A new client connection: SSL/GSS negotiation, the startup packet, cancel requests,
//! authentication; then the session takes over.

use super::auth::authenticate;
use crate::backend::cancel_backend;
use crate::error::RouterError;
use crate::protocol::{StartupPacket, decode_startup, encode_negotiate_protocol_version};
use crate::server::ServerCtx;
use crate::session::{Session, Settings};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client has this long to finish startup and login (Postgres: authentication_timeout).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one client connection to the end. Never panics on what the client sends.
pub async fn handle_connection(ctx: Arc<ServerCtx>, mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(1024);
    // Negotiation happens in the clear, at most once for SSL and once for GSS.
    let mut offered_tls = false;
    let packet = loop {
        let p = match read_startup(&mut tcp, &mut rbuf).await {
            Ok(p) => p,
            Err(e) => return reject(&mut tcp, &e).await,
        };
        match p {
            StartupPacket::SslRequest if !offered_tls => {
                offered_tls = true;
                if !rbuf.is_empty() {
                    // Bytes after SSLRequest would be read in the clear: refuse
                    // (the same hole as CVE-2021-23214 in Postgres).
                    let e = RouterError::Protocol(crate::protocol::ProtocolError::Malformed(
                        "unencrypted data after SSL request",
                    ));
                    return reject(&mut tcp, &e).await;
                }
                if let Some(acceptor) = ctx.tls.clone() {
                    if tcp.write_all(b"S").await.is_err() {
                        return;
                    }
                    let tls = match tokio::time::timeout(LOGIN_TIMEOUT, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    // Boxed: a TLS stream's state is large, and only TLS clients should pay for it.
                    return Box::pin(after_negotiation(ctx, tls, rbuf, true)).await;
                }
                if tcp.write_all(b"N").await.is_err() {
                    return;
                }
            }
            StartupPacket::GssEncRequest => {
                if tcp.write_all(b"N").await.is_err() {
                    return;
                }
            }
            other => break other,
        }
    };
    Box::pin(finish_startup(ctx, tcp, rbuf, packet, false)).await
}

async fn after_negotiation<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<ServerCtx>,
    mut stream: S,
    mut rbuf: BytesMut,
    tls: bool,
) {
    let packet = loop {
        match read_startup(&mut stream, &mut rbuf).await {
            Ok(StartupPacket::GssEncRequest) => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(StartupPacket::SslRequest) => {
                let e = RouterError::Protocol(crate::protocol::ProtocolError::Malformed(
                    "SSL request inside TLS",
                ));
                return reject(&mut stream, &e).await;
            }
            Ok(p) => break p,
            Err(e) => return reject(&mut stream, &e).await,
        }
    };
    finish_startup(ctx, stream, rbuf, packet, tls).await
}

async fn finish_startup<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: Arc<ServerCtx>,
    mut stream: S,
    mut rbuf: BytesMut,
    packet: StartupPacket,
    tls: bool,
) {
    let (minor, params) = match packet {
        StartupPacket::Cancel { pid, secret } => {
            ctx.metrics.cancel_requests.inc();
            if let Some((addr, bpid, bsecret)) = ctx.cancels.lookup(pid, secret)
                && let Err(e) = cancel_backend(addr, bpid, bsecret).await
            {
                tracing::warn!(error = %e, "forwarding a cancel request failed");
            }
            return;
        }
        StartupPacket::Startup { minor, params } => (minor, params),
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => return,
    };
    if ctx.config.tls_required && !tls {
        return reject(&mut stream, &RouterError::TlsRequired).await;
    }
    let mut out = BytesMut::new();
    let unknown_options: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if minor > 0 || !unknown_options.is_empty() {
        encode_negotiate_protocol_version(&mut out, 0, &unknown_options);
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        return reject(&mut stream, &RouterError::Auth(super::AuthError::NoUser)).await;
    };
    if get("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
        let e = RouterError::Protocol(crate::protocol::ProtocolError::Malformed(
            "replication connections are not supported by the router",
        ));
        return reject(&mut stream, &e).await;
    }
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let settings = match Settings::from_startup(&params) {
        Ok(s) => s,
        Err(e) => return reject(&mut stream, &e).await,
    };
    if !out.is_empty() && stream.write_all(&out).await.is_err() {
        return;
    }
    // Boxed: the login's state is large and lives only during the login.
    let login = tokio::time::timeout(
        LOGIN_TIMEOUT,
        Box::pin(authenticate(
            &mut stream,
            &mut rbuf,
            &ctx.config,
            &user,
            if tls { ctx.scram_plus.as_ref() } else { None },
        )),
    )
    .await;
    match login {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            ctx.metrics.client_auth_failures.inc();
            return reject(&mut stream, &e).await;
        }
        Err(_) => return,
    }
    let Some(user_cfg) = ctx.config.user(&user).cloned() else {
        return reject(
            &mut stream,
            &RouterError::Auth(super::AuthError::PasswordFailed { user }),
        )
        .await;
    };
    Session::run(ctx, stream, rbuf, user_cfg, database, settings).await;
}

async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Result<StartupPacket, RouterError> {
    let fut = async {
        loop {
            if let Some(p) = decode_startup(rbuf)? {
                return Ok(p);
            }
            if stream.read_buf(rbuf).await.map_err(RouterError::ClientIo)? == 0 {
                return Err(RouterError::ClientIo(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
    };
    tokio::time::timeout(LOGIN_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(RouterError::ClientIo(std::io::ErrorKind::TimedOut.into())))
}

/// Tells the client why, then closes.
pub async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, e: &RouterError) {
    let mut out = BytesMut::new();
    if let Some(f) = e.backend_frame() {
        out.extend_from_slice(&f.raw);
    } else if let Some(u) = e.user_facing() {
        u.encode(&mut out);
    }
    tracing::debug!(error = %e, "client connection refused");
    if !out.is_empty() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
}
