//! Client authentication and TLS through the router, against a real Postgres that
//! itself demands passwords for `sg_scram` (scram-sha-256) and `sg_md5` (md5):
//! SCRAM with a plaintext password and with a stored verifier, md5, trust, wrong
//! passwords and unknown users (28P01), TLS with psql (sslmode=require, `\conninfo`),
//! and `tls_required` refusing plaintext clients (28000).

use shardgate_tests::{EnvOptions, TestEnv, cluster, connect, pg_tool, tokio_postgres};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The roles Postgres checks passwords for (see the harness's pg_hba.conf lines).
/// Created once per test binary; roles are cluster-wide, so creation tolerates a role
/// that already exists.
fn password_roles() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let node = &cluster().node;
        node.psql(
            "postgres",
            "DO $$ BEGIN CREATE ROLE sg_scram LOGIN PASSWORD 'pw1'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        )
        .expect("create role sg_scram");
        // Stored as md5, so that Postgres really runs md5 against the router (a SCRAM
        // verifier would make Postgres answer the md5 hba line with SCRAM).
        node.psql(
            "postgres",
            "SET password_encryption = 'md5'; \
             DO $$ BEGIN CREATE ROLE sg_md5 LOGIN PASSWORD 'pw2'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        )
        .expect("create role sg_md5");
        let stored = node
            .psql(
                "postgres",
                "SELECT rolname || ':' || left(rolpassword, 3) FROM pg_authid \
                 WHERE rolname IN ('sg_scram', 'sg_md5') ORDER BY 1",
            )
            .expect("read pg_authid");
        assert_eq!(
            stored, "sg_md5:md5\nsg_scram:SCR",
            "roles stored with the expected password kinds"
        );
    });
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// Connects through the router; panics unless it fails with `want`.
async fn expect_login_error(conn_str: &str, want: &str) {
    match connect(conn_str).await {
        Ok(c) => {
            let r = c.simple_query("SELECT current_user").await;
            panic!("login with {conn_str:?} should fail with {want}, but it worked: {r:?}")
        }
        Err(e) => assert_eq!(
            sqlstate(&e).as_deref(),
            Some(want),
            "login with {conn_str:?}: {e:?}"
        ),
    }
}

/// One value from `SELECT`, through tokio-postgres.
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get::<_, String>(0)
}

/// Runs psql (no psqlrc, unaligned, tuples only) with a connection string and commands.
async fn psql(conn: String, password: Option<&str>, commands: &[&str]) -> Output {
    let password = password.map(str::to_owned);
    let commands: Vec<String> = commands.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(pg_tool("psql"));
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &conn]);
        for c in &commands {
            cmd.args(["-c", c]);
        }
        cmd.env_remove("PGPASSWORD")
            .env_remove("PGSSLMODE")
            .env("PGCONNECT_TIMEOUT", "20")
            .stdin(Stdio::null());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.output().expect("run psql")
    })
    .await
    .expect("psql task")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A self-signed certificate and key for `localhost`, made with the openssl CLI.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "1", "-subj", "/CN=localhost"])
        .stdin(Stdio::null())
        .output()
        .expect("the openssl CLI is needed for the TLS tests (Debian: apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn tls_server_keys(cert: &Path, key: &Path) -> String {
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

const SCRAM_USER: &str = "[[users]]\nname = \"sg_scram\"\npassword = \"pw1\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_login_right_and_wrong_passwords() {
    password_roles();
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: SCRAM_USER.into(),
        ..Default::default()
    })
    .await;
    let base = env.conn_str("sg_scram");

    // Right password: tokio-postgres. The query runs on Postgres as sg_scram, which
    // pg_hba makes log in with a SCRAM password: the router used its password.
    let c = connect(&format!("{base} password=pw1"))
        .await
        .expect("SCRAM login with the right password");
    assert_eq!(one(&c, "SELECT current_user::text").await, "sg_scram");
    assert_eq!(
        one(
            &c,
            "SELECT usename::text FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await,
        "sg_scram"
    );
    drop(c);

    // Right password: psql with PGPASSWORD.
    let o = psql(base.clone(), Some("pw1"), &["SELECT current_user"]).await;
    assert!(o.status.success(), "psql with PGPASSWORD=pw1: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "sg_scram");

    // Wrong password, empty password, unknown user: all 28P01.
    expect_login_error(&format!("{base} password=wrong"), "28P01").await;
    expect_login_error(&format!("{base} password=''"), "28P01").await;
    expect_login_error(
        &format!("{} password=pw1", env.conn_str("sg_nobody")),
        "28P01",
    )
    .await;
    // psql says so too, and does not get in.
    let o = psql(base.clone(), Some("wrong"), &["SELECT 1"]).await;
    assert!(
        !o.status.success(),
        "psql with a wrong password: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("password authentication failed"),
        "{}",
        text(&o)
    );

    // The router still serves after the failures.
    let c = connect(&format!("{base} password=pw1")).await.unwrap();
    assert_eq!(one(&c, "SELECT 'still here'::text").await, "still here");
}

/// The client's login succeeds at the router but the router's own login to Postgres
/// fails: the client must get Postgres's 28P01 (forwarded), promptly, not a hang until
/// the pool timeout and not a generic error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_password_is_reported_as_28p01() {
    password_roles();
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users:
            "[[users]]\nname = \"sg_scram\"\npassword = \"pw1\"\nserver_password = \"not-pw1\"\n"
                .into(),
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let r = match connect(&format!("{} password=pw1", env.conn_str("sg_scram"))).await {
        Err(e) => Err(e),
        Ok(c) => c.simple_query("SELECT 1").await.map(|_| ()),
    };
    let e = r.expect_err("Postgres refuses the router's password");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_stored_verifier() {
    password_roles();
    let verifier = cluster()
        .node
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'sg_scram'",
        )
        .expect("read verifier");
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: format!(
            "[[users]]\nname = \"sg_scram\"\nscram_verifier = \"{verifier}\"\nserver_password = \"pw1\"\n"
        ),
        ..Default::default()
    })
    .await;
    let base = env.conn_str("sg_scram");
    let c = connect(&format!("{base} password=pw1"))
        .await
        .expect("login against the stored verifier with the right password");
    assert_eq!(one(&c, "SELECT current_user::text").await, "sg_scram");
    let o = psql(base.clone(), Some("pw1"), &["SELECT 40 + 2"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "42");
    expect_login_error(&format!("{base} password=pw2"), "28P01").await;
    expect_login_error(&format!("{base} password=PW1"), "28P01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_login() {
    password_roles();
    let env = TestEnv::with(EnvOptions {
        auth_method: "md5",
        users: "[[users]]\nname = \"sg_md5\"\npassword = \"pw2\"\n".into(),
        ..Default::default()
    })
    .await;
    let base = env.conn_str("sg_md5");
    let c = connect(&format!("{base} password=pw2"))
        .await
        .expect("md5 login with the right password");
    assert_eq!(one(&c, "SELECT current_user::text").await, "sg_md5");
    let o = psql(base.clone(), Some("pw2"), &["SELECT current_user"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "sg_md5");
    expect_login_error(&format!("{base} password=pw1"), "28P01").await;
    expect_login_error(
        &format!("{} password=pw2", env.conn_str("sg_unknown")),
        "28P01",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_refuses_users_not_configured() {
    let env = TestEnv::new().await; // trust, [[users]] = postgres only
    let c = env.client().await;
    assert_eq!(one(&c, "SELECT current_user::text").await, "postgres");
    // `sg_scram` exists in Postgres, but not in the router's [[users]].
    expect_login_error(&env.conn_str("sg_scram"), "28P01").await;
    expect_login_error(&env.conn_str("nobody_at_all"), "28P01").await;
    let o = psql(env.conn_str("nobody_at_all"), None, &["SELECT 1"]).await;
    assert!(!o.status.success(), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_psql() {
    password_roles();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: SCRAM_USER.into(),
        server: tls_server_keys(&cert, &key),
        ..Default::default()
    })
    .await;
    let tls_conn = format!(
        "host=127.0.0.1 port={} user=sg_scram dbname={} sslmode=require",
        env.port(),
        env.db
    );
    // sslmode=require (and libpq's default channel_binding=prefer, which sends the
    // "y" GS2 flag when the server does not offer SCRAM-SHA-256-PLUS).
    let o = psql(
        tls_conn.clone(),
        Some("pw1"),
        &["SELECT current_user", "\\conninfo"],
    )
    .await;
    assert!(o.status.success(), "psql sslmode=require: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("sg_scram"), "{}", text(&o));
    assert!(
        out.contains("SSL connection (protocol: TLS"),
        "\\conninfo should report an SSL connection: {}",
        text(&o)
    );
    // Verifying the certificate against its own CA works too (CN=localhost).
    let o = psql(
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=sg_scram dbname={} sslmode=verify-full sslrootcert={}",
            env.port(),
            env.db,
            cert.display()
        ),
        Some("pw1"),
        &["SELECT 1"],
    )
    .await;
    assert!(o.status.success(), "psql sslmode=verify-full: {}", text(&o));
    // Plaintext is still allowed when TLS is not required, and \conninfo says so.
    let o = psql(env.conn_str("sg_scram"), Some("pw1"), &["\\conninfo"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("SSL connection"),
        "{}",
        text(&o)
    );
    // A wrong password over TLS is still 28P01.
    let o = psql(tls_conn, Some("nope"), &["SELECT 1"]).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("password authentication failed"),
        "{}",
        text(&o)
    );

    // A router without TLS refuses sslmode=require.
    let plain = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: SCRAM_USER.into(),
        ..Default::default()
    })
    .await;
    let o = psql(
        format!(
            "host=127.0.0.1 port={} user=sg_scram dbname={} sslmode=require",
            plain.port(),
            plain.db
        ),
        Some("pw1"),
        &["SELECT 1"],
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("server does not support SSL"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_plaintext() {
    password_roles();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: SCRAM_USER.into(),
        server: format!("{}tls_required = true\n", tls_server_keys(&cert, &key)),
        ..Default::default()
    })
    .await;
    // tokio-postgres without TLS (sslmode=disable): refused with 28000.
    expect_login_error(
        &format!("{} password=pw1", env.conn_str("sg_scram")),
        "28000",
    )
    .await;
    // psql sslmode=disable: refused, and the message is the router's.
    let o = psql(env.conn_str("sg_scram"), Some("pw1"), &["SELECT 1"]).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("TLS"),
        "{}",
        text(&o)
    );
    // psql sslmode=require gets in.
    let o = psql(
        format!(
            "host=127.0.0.1 port={} user=sg_scram dbname={} sslmode=require",
            env.port(),
            env.db
        ),
        Some("pw1"),
        &["SELECT current_user", "\\conninfo"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("sg_scram") && out.contains("SSL connection"),
        "{}",
        text(&o)
    );
}

/// README: for md5, `password` may be Postgres's stored form `md5<hex>`, and
/// `server_password` defaults to `password`. Clients log in with the plaintext; the
/// router must also get into Postgres (which asks for md5) with only the stored form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_with_stored_hash() {
    password_roles();
    let stored = cluster()
        .node
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'sg_md5'",
        )
        .expect("read md5 hash");
    assert!(stored.starts_with("md5") && stored.len() == 35, "{stored}");
    let env = TestEnv::with(EnvOptions {
        auth_method: "md5",
        users: format!("[[users]]\nname = \"sg_md5\"\npassword = \"{stored}\"\n"),
        ..Default::default()
    })
    .await;
    let base = env.conn_str("sg_md5");
    expect_login_error(&format!("{base} password=wrong"), "28P01").await;
    let c = connect(&format!("{base} password=pw2"))
        .await
        .expect("md5 login against the stored hash");
    let r = c.query_one("SELECT current_user::text", &[]).await;
    match r {
        Ok(row) => assert_eq!(row.get::<_, String>(0), "sg_md5"),
        Err(e) => panic!(
            "the client got in, but the router could not log in to Postgres with the stored md5 hash as server password: {:?} {e}",
            sqlstate(&e)
        ),
    }
}

/// Postgres never tells a client whether a role exists before it has answered the
/// password challenge (it runs a mock SCRAM exchange for unknown roles). Through the
/// router an unknown user must likewise be asked for a password, exactly like a known
/// one; refusing at once lets anyone enumerate the configured users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_are_challenged_like_known_ones() {
    password_roles();
    let mut problems = Vec::new();
    for (method, users) in [
        ("scram-sha-256", SCRAM_USER.to_owned()),
        (
            "md5",
            "[[users]]\nname = \"sg_md5\"\npassword = \"pw2\"\n".to_owned(),
        ),
    ] {
        let env = TestEnv::with(EnvOptions {
            auth_method: method,
            users,
            ..Default::default()
        })
        .await;
        let known = if method == "md5" {
            "sg_md5"
        } else {
            "sg_scram"
        };
        // psql -w never prompts: without a password it stops at the challenge.
        let mut seen = Vec::new();
        for user in [known, "sg_nobody"] {
            let conn = format!("{} connect_timeout=10", env.conn_str(user));
            let o = tokio::task::spawn_blocking(move || {
                Command::new(pg_tool("psql"))
                    .args(["-X", "-w", "-d", &conn, "-c", "SELECT 1"])
                    .env_remove("PGPASSWORD")
                    .env("PGPASSFILE", "/nonexistent/shardgate-test-pgpass")
                    .stdin(Stdio::null())
                    .output()
                    .expect("psql")
            })
            .await
            .unwrap();
            assert!(!o.status.success(), "{method} {user}: {}", text(&o));
            seen.push((user, String::from_utf8_lossy(&o.stderr).into_owned()));
        }
        for (user, err) in &seen {
            if !err.contains("no password supplied") {
                problems.push(format!(
                    "{method}: user {user} should be asked for a password like any other; got: {err}"
                ));
            }
        }
        assert!(
            seen[0].1.contains("no password supplied"),
            "{method}: the known user is asked for a password: {seen:?}"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Secrets from the environment (`password_env`, `server_password_env`), with the
/// router as its own process so the variables are set only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_environment() {
    password_roles();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("a_{:016x}", rand::random::<u64>());
    cluster()
        .node
        .psql("postgres", &format!("CREATE DATABASE {db}"))
        .unwrap();
    let port = shardgate::dev::fleet::free_port().unwrap();
    let config = dir.path().join("env.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nauth_method = \"scram-sha-256\"\n\n[coordinator]\nhost = \"127.0.0.1\"\nport = {}\n\n[[users]]\nname = \"sg_scram\"\npassword_env = \"SG_TEST_CLIENT_PW\"\nserver_password_env = \"SG_TEST_SERVER_PW\"\n",
            cluster().node.port
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate-under-test"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("SG_TEST_CLIENT_PW", "client-secret")
        .env("SG_TEST_SERVER_PW", "pw1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("host=127.0.0.1 port={port} user=sg_scram dbname={db} sslmode=disable");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let c = loop {
        match connect(&format!("{base} password=client-secret")).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                    "router with env passwords: {e:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(one(&c, "SELECT current_user::text").await, "sg_scram");
    expect_login_error(&format!("{base} password=pw1"), "28P01").await;
    let _ = child.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_over_tls() {
    password_roles();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let env = TestEnv::with(EnvOptions {
        auth_method: "scram-sha-256",
        users: SCRAM_USER.into(),
        server: tls_server_keys(&cert, &key),
        ..Default::default()
    })
    .await;
    let conn = |extra: &str| {
        format!(
            "host=127.0.0.1 port={} user=sg_scram dbname={} {extra}",
            env.port(),
            env.db
        )
    };
    // libpq insists on SCRAM-SHA-256-PLUS bound to the router's certificate.
    let o = psql(
        conn("sslmode=require channel_binding=require"),
        Some("pw1"),
        &["SELECT 'bound'"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "bound");
    // Wrong password with channel binding: refused.
    let o = psql(
        conn("sslmode=require channel_binding=require"),
        Some("nope"),
        &["SELECT 1"],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("password authentication failed"),
        "{}",
        text(&o)
    );
    // Without TLS there is nothing to bind to: channel_binding=require is refused by
    // the client, plain SCRAM still works.
    let o = psql(
        conn("sslmode=disable channel_binding=require"),
        Some("pw1"),
        &["SELECT 1"],
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    let o = psql(conn("sslmode=disable"), Some("pw1"), &["SELECT 1"]).await;
    assert!(o.status.success(), "{}", text(&o));
}
