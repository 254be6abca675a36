//! Control connections: plain tokio-postgres connections the router opens for its own
//! work (catalog, admin functions, DDL on shards, data moves), never lent to clients.

use std::time::Duration;
use tokio_postgres::{Client, Connection, NoTls, Socket, tls::NoTlsStream};

/// Who the router logs in as for its own work.
#[derive(Clone, Debug)]
pub struct ControlLogin {
    pub user: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// The coordinator's address.
    pub host: String,
    pub port: u16,
}

pub type ControlConn = Connection<Socket, NoTlsStream>;

fn config(login: &ControlLogin, host: &str, port: u16, database: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(port)
        .user(&login.user)
        .dbname(database)
        .application_name("shardgate")
        .connect_timeout(login.connect_timeout);
    if let Some(p) = &login.password {
        c.password(p);
    }
    c
}

/// Connects to the coordinator; the caller drives the connection.
pub async fn control_connect(
    login: &ControlLogin,
    database: &str,
) -> Result<(Client, ControlConn), tokio_postgres::Error> {
    config(login, &login.host, login.port, database)
        .connect(NoTls)
        .await
}

/// Connects to `host:port` and drives the connection in the background.
pub async fn connect_node(
    login: &ControlLogin,
    host: &str,
    port: u16,
    database: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config(login, host, port, database).connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    });
    // The router's own reads of a table (rows moved into or out of shards, a placement
    // copied) see every row or fail (42501), never the subset a row-level-security
    // policy would show its login. (A SET, not a startup option: a pooler in front of
    // a node may refuse startup options.)
    client.batch_execute("SET row_security = off").await?;
    Ok(client)
}
