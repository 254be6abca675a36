//! Query routing, differentially: a multi-tenant schema (Citus's ads example: companies,
//! campaigns and ads distributed by company and colocated, plus a reference table of ad
//! types) with the same deterministic rows in a plain Postgres database and, through the
//! router, in a fleet of two workers. The same single-tenant statements run on both and
//! must give the same rows — colocated joins, CTEs, window functions, GROUP BY/HAVING,
//! subqueries, joins with the reference table, reference-only reads, upserts,
//! UPDATE/DELETE ... RETURNING and one-tenant transactions — in the simple protocol,
//! as prepared statements with parameters (tokio-postgres), and through psycopg.
//!
//! Also: every row lies in the shard Postgres's own `hashint8` says (checked on the
//! workers); statements spanning tenants never return partial rows (an error or the
//! exact answer); a transaction writing on two nodes commits on both (two-phase commit)
//! or on neither; and swapping the planner plugin while clients run pinned queries fails no
//! statement.

use shardgate::plugin::builtin;
use shardgate_tests::tokio_postgres::types::{FromSql, ToSql, Type};
use shardgate_tests::tokio_postgres::{Client, Error, Row, SimpleQueryMessage};
use shardgate_tests::{EnvOptions, TestEnv, cluster, connect};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// Schema and data
// ---------------------------------------------------------------------------------

const TENANTS: i64 = 8;
const CAMPAIGNS_PER_TENANT: i64 = 10;
const ADS_PER_CAMPAIGN: i64 = 6;
/// A company without rows.
const UNKNOWN_TENANT: i64 = 1001;

/// One statement per entry (admin calls and DDL go through the router one by one).
const SCHEMA: &[&str] = &[
    "CREATE TABLE ad_types (id int PRIMARY KEY, name text NOT NULL)",
    "CREATE TABLE companies (id bigint PRIMARY KEY, name text NOT NULL, country text, created date)",
    "CREATE TABLE campaigns (id bigint, company_id bigint NOT NULL REFERENCES companies (id), \
     name text NOT NULL, budget numeric(12,2), status text, PRIMARY KEY (company_id, id))",
    "CREATE TABLE ads (id bigint, company_id bigint NOT NULL, campaign_id bigint NOT NULL, \
     ad_type_id int REFERENCES ad_types (id), clicks int, impressions int NOT NULL, title text, \
     PRIMARY KEY (company_id, id), \
     FOREIGN KEY (company_id, campaign_id) REFERENCES campaigns (company_id, id))",
    "CREATE INDEX ads_campaign ON ads (company_id, campaign_id)",
];

/// Rows loaded before the tables are distributed (create_distributed_table and
/// create_reference_table move them into the shards).
const PRELOAD: &[&str] = &[
    "INSERT INTO ad_types VALUES (1, 'banner'), (2, 'video'), (3, 'text'), (4, 'carousel'), \
     (5, 'audio'), (6, 'unused')",
    "INSERT INTO companies SELECT g, 'company ' || g, (ARRAY['de', 'fr', 'us', 'jp'])[g % 4 + 1], \
     date '2020-01-01' + g::int * 30 FROM generate_series(1, 8) g",
];

const DISTRIBUTE: &[&str] = &[
    "SELECT create_reference_table('ad_types')",
    "SELECT create_distributed_table('companies', 'id')",
    "SELECT create_distributed_table('campaigns', 'company_id', colocate_with => 'companies')",
    "SELECT create_distributed_table('ads', 'company_id', colocate_with => 'companies')",
];

struct Campaign {
    id: i64,
    company_id: i64,
    name: String,
    budget: String,
    status: &'static str,
}

fn campaigns() -> Vec<Campaign> {
    let mut out = Vec::new();
    for c in 1..=TENANTS {
        for k in 1..=CAMPAIGNS_PER_TENANT {
            out.push(Campaign {
                id: c * 100 + k,
                company_id: c,
                name: format!("campaign {c}-{k}"),
                budget: format!("{}.{:02}", (c * 37 + k * 13) % 500 + 100, (k * 25) % 100),
                status: ["active", "paused", "done"][(k % 3) as usize],
            });
        }
    }
    out
}

impl Campaign {
    fn insert(&self) -> String {
        format!(
            "INSERT INTO campaigns (id, company_id, name, budget, status) VALUES ({}, {}, '{}', {}, '{}')",
            self.id, self.company_id, self.name, self.budget, self.status
        )
    }
}

struct Ad {
    id: i64,
    company_id: i64,
    campaign_id: i64,
    ad_type_id: i32,
    clicks: Option<i32>,
    impressions: i32,
    title: String,
}

/// Ad ids are `company * 1000 + campaign * 10 + n`.
fn ads() -> Vec<Ad> {
    let mut out = Vec::new();
    for c in 1..=TENANTS {
        for k in 1..=CAMPAIGNS_PER_TENANT {
            for j in 1..=ADS_PER_CAMPAIGN {
                out.push(Ad {
                    id: c * 1000 + k * 10 + j,
                    company_id: c,
                    campaign_id: c * 100 + k,
                    ad_type_id: ((c + k + j) % 5 + 1) as i32,
                    clicks: (!(j == 6 && k % 4 == 0))
                        .then_some(((c * 31 + k * 17 + j * 7) % 100) as i32),
                    impressions: ((c * 53 + k * 29 + j * 11) % 1000 + 100) as i32,
                    title: format!("ad {c}-{k}-{j}"),
                });
            }
        }
    }
    out
}

impl Ad {
    fn insert(&self) -> String {
        format!(
            "INSERT INTO ads (id, company_id, campaign_id, ad_type_id, clicks, impressions, title) \
             VALUES ({}, {}, {}, {}, {}, {}, '{}')",
            self.id,
            self.company_id,
            self.campaign_id,
            self.ad_type_id,
            self.clicks.map_or("NULL".into(), |v| v.to_string()),
            self.impressions,
            self.title
        )
    }
}

const INSERT_AD: &str = "INSERT INTO ads (id, company_id, campaign_id, ad_type_id, clicks, impressions, title) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// A test's fleet (router + 2 workers) and a plain database with the same rows.
struct Fixture {
    env: TestEnv,
    plain_str: String,
    plain: Client,
}

impl Fixture {
    async fn new() -> Fixture {
        Self::with(EnvOptions::default()).await
    }

    async fn with(opts: EnvOptions) -> Fixture {
        let env = TestEnv::with(EnvOptions {
            workers: 2,
            pool_size: opts.pool_size.max(8),
            ..opts
        })
        .await;
        // The plain side: a database of its own on the coordinator's server, used
        // directly (the test's own database holds the catalog and the empty shells).
        let plain_db = format!("{}_plain", env.db);
        cluster()
            .node
            .psql("postgres", &format!("CREATE DATABASE {plain_db}"))
            .expect("create the plain database");
        let plain_str = format!(
            "host=127.0.0.1 port={} user=postgres dbname={plain_db} sslmode=disable",
            env.pg_port
        );
        let plain = connect(&plain_str).await.expect("connect to plain");
        let mut script = String::new();
        for s in SCHEMA.iter().chain(PRELOAD) {
            script.push_str(s);
            script.push_str(";\n");
        }
        for c in campaigns() {
            script.push_str(&c.insert());
            script.push_str(";\n");
        }
        for a in ads() {
            script.push_str(&a.insert());
            script.push_str(";\n");
        }
        plain.batch_execute(&script).await.expect("plain load");

        // The router side: schema and the first rows, distribution, then the rest of
        // the rows as routed single-row INSERTs (campaigns with literals in the simple
        // protocol, ads as a prepared statement with parameters).
        let r = env.client().await;
        for s in SCHEMA.iter().chain(PRELOAD).chain(DISTRIBUTE) {
            r.batch_execute(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {}", show(&e)));
        }
        for c in campaigns() {
            let s = c.insert();
            r.batch_execute(&s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {}", show(&e)));
        }
        let ins = r
            .prepare(INSERT_AD)
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
        for a in ads() {
            let n = r
                .execute(
                    &ins,
                    &[
                        &a.id,
                        &a.company_id,
                        &a.campaign_id,
                        &a.ad_type_id,
                        &a.clicks,
                        &a.impressions,
                        &a.title,
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("insert ad {}: {}", a.id, show(&e)));
            assert_eq!(n, 1);
        }
        Fixture {
            env,
            plain_str,
            plain,
        }
    }

    async fn router(&self) -> Client {
        self.env.client().await
    }

    /// Every table's rows, tenant by tenant (each a pinned read through the router),
    /// against the plain database.
    async fn assert_same_tables(&self, r: &Client) {
        let mut diffs = Vec::new();
        for c in 1..=TENANTS {
            for sql in [
                "SELECT * FROM companies WHERE id = {c}",
                "SELECT * FROM campaigns WHERE company_id = {c} ORDER BY id",
                "SELECT * FROM ads WHERE company_id = {c} ORDER BY id",
            ] {
                let sql = bind_simple(sql, c);
                let got = simple(r, &sql).await;
                let want = simple(&self.plain, &sql).await;
                if got.as_ref().map_err(show) != want.as_ref().map_err(show) {
                    diffs.push(format!(
                        "{sql}\n  router: {:?}\n  plain:  {:?}",
                        got.map_err(|e| show(&e)),
                        want.map_err(|e| show(&e))
                    ));
                }
            }
        }
        let sql = "SELECT * FROM ad_types ORDER BY id";
        let (got, want) = (simple(r, sql).await, simple(&self.plain, sql).await);
        if got.as_ref().map_err(show) != want.as_ref().map_err(show) {
            diffs.push(format!("{sql}\n  router: {got:?}\n  plain:  {want:?}"));
        }
        assert!(diffs.is_empty(), "tables differ:\n{}", diffs.join("\n"));
    }
}

// ---------------------------------------------------------------------------------
// Answers and their comparison
// ---------------------------------------------------------------------------------

/// Column names and rows as text (simple protocol) or as decoded/raw binary values
/// (extended protocol), comparable between the router and plain Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    cols: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Answer {
    fn sorted(mut self) -> Answer {
        self.rows.sort();
        self
    }
}

fn show(e: &Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

fn code(e: &Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

fn bind_simple(sql: &str, c: i64) -> String {
    sql.replace("{c}", &c.to_string())
}

fn bind_ext(sql: &str) -> String {
    sql.replace("{c}", "$1")
}

async fn simple(c: &Client, sql: &str) -> Result<Answer, Error> {
    let mut a = Answer {
        cols: Vec::new(),
        rows: Vec::new(),
    };
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                a.cols = cols.iter().map(|c| c.name().to_owned()).collect()
            }
            SimpleQueryMessage::Row(r) => {
                a.rows
                    .push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    Ok(a)
}

/// Any value as its raw binary bytes.
struct RawValue(Vec<u8>);

impl<'a> FromSql<'a> for RawValue {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

fn cell(r: &Row, i: usize) -> Option<String> {
    let t = r.columns()[i].type_();
    macro_rules! as_ {
        ($ty:ty) => {
            r.get::<_, Option<$ty>>(i).map(|v| format!("{v:?}"))
        };
    }
    match *t {
        Type::INT2 => as_!(i16),
        Type::INT4 => as_!(i32),
        Type::INT8 => as_!(i64),
        Type::FLOAT8 => as_!(f64),
        Type::BOOL => as_!(bool),
        Type::TEXT | Type::VARCHAR | Type::NAME => as_!(String),
        _ => r
            .get::<_, Option<RawValue>>(i)
            .map(|v| format!("{}:{:02x?}", t.name(), v.0)),
    }
}

fn answer(rows: &[Row], cols: Vec<String>) -> Answer {
    Answer {
        cols,
        rows: rows
            .iter()
            .map(|r| (0..r.len()).map(|i| cell(r, i)).collect())
            .collect(),
    }
}

/// A statement in the extended protocol (prepared, parameters bound), as a driver
/// sends it.
async fn extended(c: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Answer, Error> {
    let stmt = c.prepare(sql).await?;
    let cols = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    let rows = c.query(&stmt, params).await?;
    Ok(answer(&rows, cols))
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Simple,
    Extended,
}

/// Runs a tenant's statement on one side.
async fn run(c: &Client, sql: &str, tenant: i64, proto: Proto) -> Result<Answer, Error> {
    match proto {
        Proto::Simple => simple(c, &bind_simple(sql, tenant)).await,
        Proto::Extended if sql.contains("{c}") => extended(c, &bind_ext(sql), &[&tenant]).await,
        Proto::Extended => extended(c, sql, &[]).await,
    }
}

/// Collects what differed instead of stopping at the first difference.
#[derive(Default)]
struct Diffs(Vec<String>);

impl Diffs {
    fn compare(
        &mut self,
        what: &str,
        got: Result<Answer, Error>,
        want: Result<Answer, Error>,
        ordered: bool,
    ) {
        let norm = |a: Result<Answer, Error>| {
            a.map(|a| if ordered { a } else { a.sorted() })
                .map_err(|e| show(&e))
        };
        let (got, want) = (norm(got), norm(want));
        if let Err(e) = &want {
            // Every statement here is valid on plain Postgres: a failure there is a
            // mistake in the test, and equal errors on both sides would hide it.
            self.0
                .push(format!("{what}\n    fails on plain Postgres: {e}"));
        } else if got != want {
            self.0
                .push(format!("{what}\n    router: {got:?}\n    plain:  {want:?}"));
        }
    }
    fn assert_empty(&self, statements: usize) {
        assert!(
            self.0.is_empty(),
            "{} of {statements} statements differ:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------
// Single-tenant statements
// ---------------------------------------------------------------------------------

/// A read pinned to one tenant (`{c}`); `ordered` when its top level has an ORDER BY
/// that fixes the row order (otherwise rows are compared as a multiset).
struct Q {
    sql: &'static str,
    ordered: bool,
}

const fn q(sql: &'static str) -> Q {
    Q { sql, ordered: true }
}

const fn unordered(sql: &'static str) -> Q {
    Q {
        sql,
        ordered: false,
    }
}

const READS: &[Q] = &[
    // One table, fast-path shaped.
    unordered("SELECT * FROM companies WHERE id = {c}"),
    q("SELECT id, name, budget, status FROM campaigns WHERE company_id = {c} ORDER BY id"),
    unordered("SELECT * FROM ads WHERE company_id = {c} AND id = {c} * 1000 + 11"),
    unordered(
        "SELECT count(*), sum(clicks), avg(clicks), min(impressions), max(impressions), \
         count(*) FILTER (WHERE clicks IS NULL) FROM ads WHERE company_id = {c}",
    ),
    unordered(
        "SELECT campaign_id, count(*), sum(clicks) FROM ads WHERE company_id = {c} GROUP BY campaign_id",
    ),
    q(
        "SELECT campaign_id, sum(clicks) AS clicks, count(*) FROM ads WHERE company_id = {c} \
       GROUP BY campaign_id HAVING sum(clicks) > 200 ORDER BY campaign_id",
    ),
    q("SELECT DISTINCT ad_type_id FROM ads WHERE company_id = {c} ORDER BY 1 LIMIT 3 OFFSET 1"),
    q("SELECT id, title FROM ads WHERE company_id = {c} AND clicks IS NULL ORDER BY id"),
    q(
        "SELECT id, clicks, impressions, round(100.0 * clicks / impressions, 3) AS ctr \
       FROM ads WHERE company_id = {c} ORDER BY ctr DESC NULLS LAST, id LIMIT 5",
    ),
    unordered(
        "SELECT string_agg(title, ',' ORDER BY id), array_agg(clicks ORDER BY id) \
         FROM ads WHERE company_id = {c} AND campaign_id = {c} * 100 + 4",
    ),
    // Window functions.
    q("SELECT id, campaign_id, clicks, \
       rank() OVER (PARTITION BY campaign_id ORDER BY clicks DESC NULLS LAST, id), \
       sum(clicks) OVER (PARTITION BY campaign_id), \
       lag(id) OVER (ORDER BY id) \
       FROM ads WHERE company_id = {c} ORDER BY id"),
    // Colocated joins, both sides pinned.
    q(
        "SELECT ca.name, a.title, a.clicks FROM campaigns ca JOIN ads a \
       ON a.company_id = ca.company_id AND a.campaign_id = ca.id \
       WHERE ca.company_id = {c} AND a.company_id = {c} ORDER BY a.id",
    ),
    // ... and pinned through the join on the distribution column.
    q("SELECT ca.name, a.title FROM campaigns ca JOIN ads a \
       ON a.company_id = ca.company_id AND a.campaign_id = ca.id \
       WHERE ca.company_id = {c} AND a.clicks > 80 ORDER BY a.id"),
    q(
        "SELECT co.name, ca.name, count(a.id), sum(a.clicks) FROM companies co \
       JOIN campaigns ca ON ca.company_id = co.id \
       JOIN ads a ON a.company_id = ca.company_id AND a.campaign_id = ca.id \
       WHERE co.id = {c} GROUP BY co.name, ca.name ORDER BY ca.name",
    ),
    q(
        "SELECT ca.id, count(a.id) FROM campaigns ca LEFT JOIN ads a \
       ON a.company_id = ca.company_id AND a.campaign_id = ca.id AND a.clicks > 90 \
       WHERE ca.company_id = {c} GROUP BY ca.id ORDER BY ca.id",
    ),
    // CTEs.
    q(
        "WITH top AS (SELECT campaign_id, sum(clicks) AS s FROM ads WHERE company_id = {c} \
       GROUP BY campaign_id) \
       SELECT ca.name, top.s FROM top JOIN campaigns ca ON ca.id = top.campaign_id \
       AND ca.company_id = {c} ORDER BY top.s DESC NULLS LAST, ca.name",
    ),
    q(
        "WITH m AS MATERIALIZED (SELECT * FROM ads WHERE company_id = {c}) \
       SELECT campaign_id, max(clicks) FROM m GROUP BY campaign_id ORDER BY 1",
    ),
    // Subqueries.
    q(
        "SELECT name FROM campaigns WHERE company_id = {c} AND id IN \
       (SELECT campaign_id FROM ads WHERE company_id = {c} AND clicks > 50) ORDER BY name",
    ),
    q(
        "SELECT a.id FROM ads a WHERE a.company_id = {c} AND a.clicks > \
       (SELECT avg(clicks) FROM ads b WHERE b.company_id = {c}) ORDER BY a.id",
    ),
    q(
        "SELECT ca.id FROM campaigns ca WHERE ca.company_id = {c} AND NOT EXISTS \
       (SELECT 1 FROM ads a WHERE a.company_id = ca.company_id AND a.campaign_id = ca.id \
       AND a.clicks < 20) ORDER BY ca.id",
    ),
    q(
        "SELECT s.campaign_id, s.total FROM (SELECT campaign_id, sum(impressions) AS total \
       FROM ads WHERE company_id = {c} GROUP BY campaign_id) s WHERE s.total > 2500 \
       ORDER BY s.total DESC, s.campaign_id",
    ),
    // With the reference table.
    q(
        "SELECT t.name, count(*), coalesce(sum(a.clicks), 0) FROM ads a \
       JOIN ad_types t ON t.id = a.ad_type_id WHERE a.company_id = {c} \
       GROUP BY t.name ORDER BY t.name",
    ),
    q(
        "SELECT a.id, t.name FROM ads a, ad_types t WHERE a.company_id = {c} \
       AND a.ad_type_id = t.id AND t.name IN ('video', 'audio') ORDER BY a.id",
    ),
    q(
        "SELECT t.name, (SELECT count(*) FROM ads a WHERE a.company_id = {c} AND a.ad_type_id = t.id) \
       FROM ad_types t ORDER BY t.id",
    ),
];

/// Reads of the reference table only (no tenant).
const REFERENCE_READS: &[Q] = &[
    q("SELECT id, name FROM ad_types ORDER BY id"),
    unordered("SELECT count(*), max(id), string_agg(name, ',' ORDER BY name) FROM ad_types"),
    q("SELECT t1.name, t2.name FROM ad_types t1 JOIN ad_types t2 ON t2.id = t1.id + 1 ORDER BY 1"),
    unordered("SELECT name FROM ad_types WHERE id = {c}::bigint % 6 + 1"),
];

async fn reads_match(f: &Fixture, proto: Proto) -> (usize, Diffs) {
    let r = f.router().await;
    let mut diffs = Diffs::default();
    let mut n = 0;
    // The tenants, and one that has no rows.
    for c in (1..=TENANTS).chain([UNKNOWN_TENANT]) {
        for q in READS.iter().chain(REFERENCE_READS) {
            let got = run(&r, q.sql, c, proto).await;
            let want = run(&f.plain, q.sql, c, proto).await;
            diffs.compare(&format!("{proto:?} c={c}: {}", q.sql), got, want, q.ordered);
            n += 1;
        }
    }
    (n, diffs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_tenant_reads_match_plain_postgres() {
    let t = Instant::now();
    let f = Fixture::new().await;
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    let (n1, simple) = reads_match(&f, Proto::Simple).await;
    let (n2, ext) = reads_match(&f, Proto::Extended).await;
    simple.assert_empty(n1);
    ext.assert_empty(n2);
    // The same prepared statement for every tenant (one plan, many bindings).
    let r = f.router().await;
    let mut diffs = Diffs::default();
    for q in READS {
        let sql = bind_ext(q.sql);
        let (rs, ps) = (r.prepare(&sql).await, f.plain.prepare(&sql).await.unwrap());
        let rs = match rs {
            Ok(s) => s,
            Err(e) => {
                diffs.0.push(format!("prepare {sql}: {}", show(&e)));
                continue;
            }
        };
        for round in 0..2 {
            for c in 1..=TENANTS {
                let cols = ps.columns().iter().map(|c| c.name().to_owned()).collect();
                let got = r.query(&rs, &[&c]).await.map(|rows| answer(&rows, cols));
                let cols = ps.columns().iter().map(|c| c.name().to_owned()).collect();
                let want = f
                    .plain
                    .query(&ps, &[&c])
                    .await
                    .map(|rows| answer(&rows, cols));
                diffs.compare(
                    &format!("prepared round {round} c={c}: {sql}"),
                    got,
                    want,
                    q.ordered,
                );
            }
        }
    }
    diffs.assert_empty(READS.len() * 2 * TENANTS as usize);
    eprintln!(
        "{} reads in each protocol matched, {:.1} s",
        n1,
        t.elapsed().as_secs_f64()
    );
}

/// Writes pinned to one tenant, run in this order on both sides.
const WRITES: &[Q] = &[
    // Upsert hitting an existing row, then a new one, then DO NOTHING.
    unordered(
        "INSERT INTO ads (company_id, id, campaign_id, ad_type_id, clicks, impressions, title) \
         VALUES ({c}, {c}::bigint * 1000 + 11, {c}::bigint * 100 + 1, 2, 5, 50, 'upserted') \
         ON CONFLICT (company_id, id) DO UPDATE SET clicks = ads.clicks + excluded.clicks, \
         title = excluded.title RETURNING id, clicks, title",
    ),
    unordered(
        "INSERT INTO ads (company_id, id, campaign_id, ad_type_id, clicks, impressions, title) \
         VALUES ({c}, {c}::bigint * 1000 + 999, {c}::bigint * 100 + 2, 3, 7, 70, 'new') \
         ON CONFLICT (company_id, id) DO UPDATE SET clicks = excluded.clicks RETURNING *",
    ),
    unordered(
        "INSERT INTO ads (company_id, id, campaign_id, ad_type_id, clicks, impressions, title) \
         VALUES ({c}, {c}::bigint * 1000 + 999, {c}::bigint * 100 + 2, 3, 7, 70, 'again') \
         ON CONFLICT DO NOTHING RETURNING id",
    ),
    unordered(
        "UPDATE campaigns SET budget = budget * 1.1 WHERE company_id = {c} AND status = 'active' \
         RETURNING id, budget",
    ),
    unordered(
        "UPDATE ads SET clicks = coalesce(clicks, 0) + 1 WHERE company_id = {c} \
         AND campaign_id = {c} * 100 + 4 RETURNING id, clicks",
    ),
    unordered("DELETE FROM ads WHERE company_id = {c} AND clicks < 10 RETURNING id, clicks"),
    unordered(
        "UPDATE campaigns SET status = 'hot' WHERE company_id = {c} AND id IN \
         (SELECT campaign_id FROM ads WHERE company_id = {c} GROUP BY campaign_id \
         HAVING sum(clicks) > 250) RETURNING id, status",
    ),
    unordered(
        "UPDATE ads SET title = ads.title || ' (' || t.name || ')' FROM ad_types t \
         WHERE ads.company_id = {c} AND t.id = ads.ad_type_id AND ads.campaign_id = {c} * 100 + 3 \
         RETURNING ads.id, ads.title",
    ),
    unordered("UPDATE companies SET name = name || ' inc' WHERE id = {c} RETURNING *"),
    unordered("DELETE FROM ads WHERE company_id = {c} AND id = {c} * 1000 + 999"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_tenant_writes_and_transactions_match_plain_postgres() {
    let t = Instant::now();
    let f = Fixture::new().await;
    let r = f.router().await;
    let mut diffs = Diffs::default();
    let mut n = 0;
    // Writes: tenants 1-4 in the simple protocol, 5-8 as prepared statements.
    for c in 1..=TENANTS {
        let proto = if c <= 4 {
            Proto::Simple
        } else {
            Proto::Extended
        };
        for w in WRITES {
            let got = run(&r, w.sql, c, proto).await;
            let want = run(&f.plain, w.sql, c, proto).await;
            diffs.compare(&format!("{proto:?} c={c}: {}", w.sql), got, want, w.ordered);
            n += 1;
        }
    }
    diffs.assert_empty(n);
    f.assert_same_tables(&r).await;

    // One tenant's transactions, statement by statement: committed and rolled back.
    let committed: &[&str] = &[
        "BEGIN",
        "UPDATE ads SET clicks = clicks + 100 WHERE company_id = {c} AND campaign_id = {c} * 100 + 5",
        "SELECT sum(clicks), count(*) FROM ads WHERE company_id = {c}",
        "UPDATE campaigns SET budget = budget + 1 WHERE company_id = {c} RETURNING id, budget",
        "SELECT t.name, count(*) FROM ads a JOIN ad_types t ON t.id = a.ad_type_id \
         WHERE a.company_id = {c} GROUP BY t.name",
        "COMMIT",
    ];
    let rolled_back: &[&str] = &[
        "BEGIN",
        "DELETE FROM ads WHERE company_id = {c} AND campaign_id <> {c} * 100 + 1",
        "SELECT count(*) FROM ads WHERE company_id = {c}",
        "INSERT INTO campaigns (company_id, id, name) VALUES ({c}, {c}::bigint * 100 + 77, 'temp') RETURNING *",
        "SELECT id, name FROM campaigns WHERE company_id = {c}",
        "ROLLBACK",
    ];
    for c in 1..=TENANTS {
        let proto = if c % 2 == 1 {
            Proto::Simple
        } else {
            Proto::Extended
        };
        for script in [committed, rolled_back] {
            for s in script {
                let (got, want) = match proto {
                    Proto::Simple => (
                        simple(&r, &bind_simple(s, c)).await,
                        simple(&f.plain, &bind_simple(s, c)).await,
                    ),
                    // BEGIN/COMMIT/ROLLBACK as drivers send them; the rest prepared.
                    Proto::Extended if !s.contains("{c}") => {
                        (extended(&r, s, &[]).await, extended(&f.plain, s, &[]).await)
                    }
                    Proto::Extended => (
                        extended(&r, &bind_ext(s), &[&c]).await,
                        extended(&f.plain, &bind_ext(s), &[&c]).await,
                    ),
                };
                let failed = got.is_err();
                diffs.compare(&format!("txn {proto:?} c={c}: {s}"), got, want, false);
                if failed {
                    let _ = r.batch_execute("ROLLBACK").await;
                    let _ = f.plain.batch_execute("ROLLBACK").await;
                    break;
                }
            }
        }
    }
    // The same through tokio-postgres' transaction API (prepared statements inside).
    let mut r2 = f.router().await;
    let mut p2 = connect(&f.plain_str).await.unwrap();
    for c in [3i64, 6] {
        for commit in [true, false] {
            let rt = r2.transaction().await.unwrap();
            let pt = p2.transaction().await.unwrap();
            for s in &committed[1..committed.len() - 1] {
                let sql = bind_ext(s);
                let got = match rt.prepare(&sql).await {
                    Ok(st) => rt.query(&st, &[&c]).await.map(|rows| answer(&rows, vec![])),
                    Err(e) => Err(e),
                };
                let st = pt.prepare(&sql).await.unwrap();
                let want = pt.query(&st, &[&c]).await.map(|rows| answer(&rows, vec![]));
                diffs.compare(
                    &format!("transaction() c={c} commit={commit}: {s}"),
                    got,
                    want,
                    false,
                );
            }
            if commit {
                let got = rt.commit().await.map_err(|e| show(&e));
                assert_eq!(got, Ok(()), "commit c={c}");
                pt.commit().await.unwrap();
            } else {
                rt.rollback().await.unwrap();
                pt.rollback().await.unwrap();
            }
        }
    }
    diffs.assert_empty(n);
    f.assert_same_tables(&r).await;
    assert_rows_where_hash_says(&f).await;
    eprintln!(
        "writes and transactions matched, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------
// Where the rows are
// ---------------------------------------------------------------------------------

/// Every row of each distributed table is in the shard whose hash range holds
/// `hashint8(company_id)` as computed by the worker's Postgres, on the node the catalog
/// names, and the shards together hold exactly the plain database's rows. Colocated
/// tables keep a tenant's rows on one node.
async fn assert_rows_where_hash_says(f: &Fixture) {
    let d = f.env.direct().await;
    let mut node_of_tenant: BTreeMap<(String, i64), u16> = BTreeMap::new();
    for (table, col) in [
        ("companies", "id"),
        ("campaigns", "company_id"),
        ("ads", "company_id"),
    ] {
        let shards = d
            .query(
                "SELECT s.shardid, s.shardminvalue::int, s.shardmaxvalue::int, n.nodeport \
                 FROM shardgate.pg_dist_shard s JOIN shardgate.pg_dist_placement p USING (shardid) \
                 JOIN shardgate.pg_dist_node n ON n.groupid = p.groupid \
                 WHERE s.logicalrelid = $1::text::regclass",
                &[&table],
            )
            .await
            .unwrap();
        assert!(!shards.is_empty(), "{table} has shards");
        let mut found = BTreeSet::new();
        for s in &shards {
            let (id, min, max, port): (i64, i32, i32, i32) =
                (s.get(0), s.get(1), s.get(2), s.get(3));
            let w = f
                .env
                .worker_ports
                .iter()
                .position(|p| *p as i32 == port)
                .expect("a placement on one of the test's workers");
            let shard = shardgate::catalog::shard_name(table, id);
            let rows = f
                .env
                .worker(w)
                .await
                .query(
                    &format!("SELECT {col}, id, hashint8({col}) FROM public.\"{shard}\""),
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("{shard} on worker {w}: {e}"));
            for row in rows {
                let (tenant, id, h): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
                assert!(
                    (min..=max).contains(&h),
                    "{table} row {id} of tenant {tenant} (hashint8 {h}) is in {shard} [{min}, {max}]"
                );
                assert!(found.insert((tenant, id)), "{table} row {id} twice");
                let prev = node_of_tenant.insert((table.to_owned(), tenant), port as u16);
                assert!(prev.is_none() || prev == Some(port as u16));
            }
        }
        let want: BTreeSet<(i64, i64)> = f
            .plain
            .query(&format!("SELECT {col}, id FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(found, want, "{table}: rows in the shards vs plain");
    }
    for c in 1..=TENANTS {
        let nodes: BTreeSet<_> = node_of_tenant
            .iter()
            .filter(|((_, t), _)| *t == c)
            .map(|(_, p)| *p)
            .collect();
        assert!(nodes.len() <= 1, "tenant {c} spread over nodes {nodes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_rows_are_in_the_shard_postgres_hashes_them_to() {
    let f = Fixture::new().await;
    assert_rows_where_hash_says(&f).await;
    // The shard the router names for each tenant is the one holding its rows.
    let r = f.router().await;
    let d = f.env.direct().await;
    for c in 1..=TENANTS {
        let shard: i64 = simple(
            &r,
            &format!("SELECT get_shard_id_for_distribution_column('ads', {c})"),
        )
        .await
        .unwrap()
        .rows[0][0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        let ok: bool = d
            .query_one(
                "SELECT hashint8($1) BETWEEN shardminvalue::int AND shardmaxvalue::int \
                 FROM shardgate.pg_dist_shard WHERE shardid = $2",
                &[&c, &shard],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ok, "tenant {c}: shard {shard}");
    }
}

// ---------------------------------------------------------------------------------
// Statements that span tenants
// ---------------------------------------------------------------------------------

/// Node port and shard id of a tenant.
async fn tenant_home(f: &Fixture, c: i64) -> (i32, i64) {
    let d = f.env.direct().await;
    let row = d
        .query_one(
            "SELECT n.nodeport, s.shardid FROM shardgate.pg_dist_shard s \
             JOIN shardgate.pg_dist_placement p USING (shardid) \
             JOIN shardgate.pg_dist_node n ON n.groupid = p.groupid \
             WHERE s.logicalrelid = 'ads'::regclass \
             AND hashint8($1) BETWEEN s.shardminvalue::int AND s.shardmaxvalue::int",
            &[&c],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Two tenants whose rows live on different nodes.
async fn tenants_on_two_nodes(f: &Fixture) -> (i64, i64) {
    let (home1, _) = tenant_home(f, 1).await;
    for c in 2..=TENANTS {
        if tenant_home(f, c).await.0 != home1 {
            return (1, c);
        }
    }
    panic!("all tenants on one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_spanning_tenants_never_return_partial_rows() {
    let f = Fixture::new().await;
    let r = f.router().await;
    // Two tenants in different shards (and on different nodes).
    let (a, b) = tenants_on_two_nodes(&f).await;
    assert_ne!(tenant_home(&f, a).await.1, tenant_home(&f, b).await.1);
    let reads: &[Q] = &[
        q("SELECT company_id, id, clicks FROM ads WHERE company_id IN ({a}, {b}) ORDER BY 1, 2"),
        q(
            "SELECT company_id, id FROM ads WHERE company_id = {a} OR company_id = {b} ORDER BY 1, 2",
        ),
        q(
            "SELECT company_id, count(*) FROM ads WHERE company_id = {a} OR campaign_id = {b}::bigint * 100 + 1 \
           GROUP BY 1 ORDER BY 1",
        ),
        unordered("SELECT count(*), sum(clicks) FROM ads"),
        q(
            "SELECT a.id, ca.id FROM ads a JOIN campaigns ca ON ca.status = 'active' \
           WHERE a.company_id = {a} AND ca.company_id = {b} AND a.campaign_id = {a} * 100 + 1 \
           ORDER BY 1, 2",
        ),
        q("SELECT id FROM campaigns WHERE company_id = {a} UNION ALL \
           SELECT id FROM campaigns WHERE company_id = {b} ORDER BY 1"),
        q("SELECT id FROM companies WHERE id = {a} AND id = {b}"),
        q("SELECT id FROM ads WHERE company_id = {a} AND id IN \
           (SELECT id - ({b} - {a}) * 1000 FROM ads WHERE company_id = {b}) ORDER BY 1"),
    ];
    let bind = |sql: &str| {
        (
            sql.replace("{a}", &a.to_string())
                .replace("{b}", &b.to_string()),
            sql.replace("{a}", "$1").replace("{b}", "$2"),
        )
    };
    let mut diffs = Diffs::default();
    let mut refused = 0;
    let mut answered = 0;
    for q in reads {
        let (lit, par) = bind(q.sql);
        let uses_params = par.contains('$');
        let pairs = [
            (
                simple(&r, &lit).await,
                simple(&f.plain, &lit).await,
                "simple",
            ),
            if uses_params {
                (
                    extended(&r, &par, &[&a, &b]).await,
                    extended(&f.plain, &par, &[&a, &b]).await,
                    "extended",
                )
            } else {
                (
                    extended(&r, &par, &[]).await,
                    extended(&f.plain, &par, &[]).await,
                    "extended",
                )
            },
        ];
        for (got, want, proto) in pairs {
            match &got {
                Err(e) if code(e).as_deref() == Some("0A000") => refused += 1,
                _ => {
                    answered += 1;
                    eprintln!("answered ({proto}): {lit}");
                    diffs.compare(&format!("{proto}: {lit}"), got, want, q.ordered);
                }
            }
        }
    }
    // Writes spanning tenants: refused (and nothing changed) or exactly right.
    let writes = [
        "UPDATE ads SET clicks = 0 WHERE company_id IN ({a}, {b}) AND campaign_id % 100 = 1 RETURNING company_id, id",
        "DELETE FROM ads WHERE (company_id = {a} OR company_id = {b}) AND id % 10 = 6 RETURNING company_id, id",
        "INSERT INTO campaigns (id, company_id, name) VALUES ({a} * 100 + 55, {a}, 'x'), ({b} * 100 + 55, {b}, 'y') RETURNING company_id, id",
    ];
    for w in writes {
        let (lit, _) = bind(w);
        let got = simple(&r, &lit).await;
        match &got {
            Err(e) if code(e).as_deref() == Some("0A000") => refused += 1,
            _ => {
                answered += 1;
                eprintln!("answered: {lit}");
                let want = simple(&f.plain, &lit).await;
                diffs.compare(&format!("write: {lit}"), got, want, false);
            }
        }
        f.assert_same_tables(&r).await;
    }
    diffs.assert_empty(reads.len() * 2 + writes.len());
    eprintln!("spanning tenants: {refused} refused with 0A000, {answered} answered exactly");
}

/// Reads of every shard that are the rows of each shard put together (the pushdown
/// tier's `concat` plans) give exactly plain Postgres's rows, in both protocols, inside
/// a transaction too; multi-shard reads whose shards' rows would need combining are
/// refused with 0A000, never answered per shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_by_row_reads_of_every_shard_match_plain_postgres() {
    let f = Fixture::new().await;
    let r = f.router().await;
    let reads = [
        "SELECT * FROM ads",
        "SELECT company_id, id, clicks * 2 + 1, upper(title) FROM ads WHERE clicks > $1",
        "SELECT CASE WHEN status = 'active' THEN name END, (budget > $1::int) IS TRUE FROM campaigns",
        "SELECT a.id, coalesce(a.clicks, -1) FROM ads a WHERE a.campaign_id % 100 = 1 OR a.clicks < $1",
        "SELECT id, name FROM companies WHERE id IN (1, 2, 3) OR country = 'x' AND $1::int > 0",
    ];
    let mut diffs = Diffs::default();
    for sql in reads {
        let lit = sql.replace("$1", "5");
        diffs.compare(
            &format!("simple: {lit}"),
            simple(&r, &lit).await,
            simple(&f.plain, &lit).await,
            false,
        );
        let (got, want) = if sql.contains("$1") {
            (
                extended(&r, sql, &[&5i32]).await,
                extended(&f.plain, sql, &[&5i32]).await,
            )
        } else {
            (
                extended(&r, sql, &[]).await,
                extended(&f.plain, sql, &[]).await,
            )
        };
        diffs.compare(&format!("extended: {sql}"), got, want, false);
    }
    // A literal key of another type than the column's: compared as numbers by
    // Postgres, so not a shard key (the statement reads every shard).
    for sql in [
        "SELECT id, name FROM companies WHERE id = 3.0",
        "SELECT id, name FROM companies WHERE id = 9223372036854775808",
        "SELECT company_id, id FROM campaigns WHERE company_id = 2.5",
    ] {
        diffs.compare(
            sql,
            simple(&r, sql).await,
            simple(&f.plain, sql).await,
            false,
        );
    }
    diffs.assert_empty(reads.len() * 2 + 3);
    // The tag counts the rows of every shard.
    let all = r.simple_query("SELECT id FROM ads").await.expect("read");
    let want = f
        .plain
        .query_one("SELECT count(*) FROM ads", &[])
        .await
        .expect("count")
        .get::<_, i64>(0);
    let tag = all.iter().find_map(|m| match m {
        shardgate_tests::tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(
        tag,
        Some(want as u64),
        "SELECT tag of a read of every shard"
    );

    // Inside a transaction: the transaction's own writes, on whichever node, are read.
    let (a, b) = tenants_on_two_nodes(&f).await;
    let read = "SELECT company_id, id FROM campaigns WHERE id % 100 = 77";
    for c in [&r, &f.plain] {
        c.batch_execute("BEGIN").await.expect("begin");
        c.batch_execute(&format!(
            "INSERT INTO campaigns (id, company_id, name) VALUES ({a} * 100 + 77, {a}, 'x')"
        ))
        .await
        .expect("insert");
    }
    diffs.compare(
        "in a transaction",
        simple(&r, read).await,
        simple(&f.plain, read).await,
        false,
    );
    for c in [&r, &f.plain] {
        c.batch_execute(&format!(
            "INSERT INTO campaigns (id, company_id, name) VALUES ({b} * 100 + 77, {b}, 'y')"
        ))
        .await
        .expect("insert on the other node");
    }
    diffs.compare(
        "in a transaction that wrote on two nodes",
        extended(&r, read, &[]).await,
        extended(&f.plain, read, &[]).await,
        false,
    );
    for c in [&r, &f.plain] {
        c.batch_execute("ROLLBACK").await.expect("rollback");
    }
    diffs.compare(
        "after ROLLBACK",
        simple(&r, read).await,
        simple(&f.plain, read).await,
        false,
    );
    diffs.assert_empty(reads.len() * 2 + 3);
    assert!(
        simple(&r, read).await.expect("read").rows.is_empty(),
        "the rolled-back rows are gone"
    );

    // A read of every shard that fails on one shard after others answered, inside a
    // savepoint: ROLLBACK TO rescues the transaction, as on one Postgres (the shards
    // that answered only read).
    for c in 1..=TENANTS {
        r.batch_execute("BEGIN").await.unwrap();
        r.batch_execute(&format!(
            "INSERT INTO campaigns (id, company_id, name) VALUES ({c} * 100 + 78, {c}, 'kept')"
        ))
        .await
        .unwrap();
        r.batch_execute("SAVEPOINT s").await.unwrap();
        let e = r
            .query("SELECT 1 / (company_id - $1) FROM ads", &[&c])
            .await
            .unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("22012"), "{e:?}");
        r.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
        r.batch_execute("COMMIT").await.unwrap();
        let kept = r
            .query(
                "SELECT name FROM campaigns WHERE company_id = $1 AND id = $1 * 100 + 78",
                &[&c],
            )
            .await
            .unwrap();
        assert_eq!(
            kept.len(),
            1,
            "tenant {c}: the write before the savepoint is kept"
        );
        r.execute(
            "DELETE FROM campaigns WHERE company_id = $1 AND id = $1 * 100 + 78",
            &[&c],
        )
        .await
        .unwrap();
    }

    // A user aggregate that overloads a row-by-row built-in's name is never run per
    // shard: the answer is plain Postgres's or an error.
    r.batch_execute(
        "CREATE FUNCTION sg_add2(int, int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + coalesce($2, 0)'; \
         CREATE AGGREGATE length(int) (sfunc = sg_add2, stype = int, initcond = '0')",
    )
    .await
    .expect("an aggregate named length");
    f.plain
        .batch_execute(
            "CREATE FUNCTION sg_add2(int, int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + coalesce($2, 0)'; \
             CREATE AGGREGATE length(int) (sfunc = sg_add2, stype = int, initcond = '0')",
        )
        .await
        .expect("the same on plain Postgres");
    let sql = "SELECT length(clicks) FROM ads";
    if let Ok(got) = simple(&r, sql).await {
        diffs.compare(sql, Ok(got), simple(&f.plain, sql).await, false);
        diffs.assert_empty(1);
    }

    // Reads whose shards' rows would have to be combined: refused, never per shard.
    r.batch_execute(
        "CREATE FUNCTION sg_add(int, int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + coalesce($2, 0)'; \
         CREATE AGGREGATE sg_total(int) (sfunc = sg_add, stype = int, initcond = '0')",
    )
    .await
    .expect("a user-defined aggregate");
    for sql in [
        "SELECT count(*) FROM ads",
        "SELECT sg_total(clicks) FROM ads",
        "SELECT pg_catalog.sum(clicks) FROM ads",
        "SELECT id FROM ads ORDER BY id",
        "SELECT id FROM ads LIMIT 3",
        "SELECT DISTINCT company_id FROM ads",
        "SELECT company_id FROM ads GROUP BY company_id",
        "SELECT id, rank() OVER (ORDER BY clicks) FROM ads",
        "SELECT id FROM ads WHERE clicks > (SELECT avg(clicks) FROM ads)",
        "SELECT (SELECT max(a.clicks)) FROM ads a",
        "SELECT id FROM ads FOR UPDATE",
        // `a.count` and `(a).count` are the aggregate count(a) to Postgres; system
        // columns differ per shard.
        "SELECT a.count FROM ads a",
        "SELECT (a).count FROM ads a",
        "SELECT ctid, id FROM ads",
        "SELECT id FROM ads WHERE tableoid > 0",
        "SELECT x.id FROM ads AS x(id)",
    ] {
        for (proto, got) in [
            ("simple", simple(&r, sql).await),
            ("extended", extended(&r, sql, &[]).await),
        ] {
            match got {
                Err(e) if code(&e).as_deref() == Some("0A000") => {}
                other => panic!("{proto}: {sql}: expected 0A000, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_writing_on_two_nodes_commits_on_both_or_neither() {
    let f = Fixture::new().await;
    let (a, b) = tenants_on_two_nodes(&f).await;
    let upd = |c: i64, v: i64| {
        format!(
            "UPDATE ads SET clicks = {v} WHERE company_id = {c} AND campaign_id = {c} * 100 + 1"
        )
    };
    // Simple protocol, statement by statement, then COMMIT: two-phase commit, and the
    // same changes on plain Postgres give the same tables.
    let r = f.router().await;
    for c in [&r, &f.plain] {
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(&upd(a, -1))
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
        c.batch_execute(&upd(b, -1))
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
        c.batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
    }
    f.assert_same_tables(&r).await;
    // Rolled back: nothing changes.
    r.batch_execute("BEGIN").await.unwrap();
    r.batch_execute(&upd(a, -7)).await.unwrap();
    r.batch_execute(&upd(b, -7)).await.unwrap();
    r.batch_execute("ROLLBACK").await.unwrap();
    f.assert_same_tables(&r).await;

    // Extended protocol through tokio-postgres' transaction API.
    {
        let mut r2 = f.router().await;
        let sql = "UPDATE ads SET clicks = -2 WHERE company_id = $1 AND campaign_id = $1 * 100 + 2";
        let tx = r2.transaction().await.unwrap();
        tx.execute(sql, &[&b])
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
        tx.execute(sql, &[&a])
            .await
            .unwrap_or_else(|e| panic!("{}", show(&e)));
        tx.commit().await.unwrap_or_else(|e| panic!("{}", show(&e)));
        for c in [a, b] {
            f.plain.execute(sql, &[&c]).await.unwrap();
        }
        f.assert_same_tables(&r2).await;
    }
    // A write after a read on another node is fine (one node wrote): not refused.
    let r3 = f.router().await;
    r3.batch_execute("BEGIN").await.unwrap();
    let n = simple(
        &r3,
        &format!("SELECT count(*) FROM ads WHERE company_id = {a}"),
    )
    .await;
    let w = r3
        .batch_execute(&format!(
            "UPDATE ads SET title = title WHERE company_id = {b} AND id = {b} * 1000 + 11"
        ))
        .await;
    r3.batch_execute("ROLLBACK").await.unwrap();
    assert!(n.is_ok(), "{:?}", n.map_err(|e| show(&e)));
    assert!(w.is_ok(), "{:?}", w.map_err(|e| show(&e)));
    f.assert_same_tables(&f.router().await).await;
    assert_rows_where_hash_says(&f).await;
}

// ---------------------------------------------------------------------------------
// psycopg
// ---------------------------------------------------------------------------------

/// Runs single-tenant statements through psycopg 3 on the router and on plain Postgres:
/// server-side binding (extended protocol, Python ints as parameters), forced prepared
/// statements, a ClientCursor (simple protocol) and a rolled-back and a committed
/// transaction. Prints "OK" or what differed.
const PSYCOPG_CHECK: &str = r#"
import sys
try:
    import psycopg
except ImportError as e:
    print(f"SKIP {e}")
    sys.exit(0)

router_dsn, plain_dsn, tenants = sys.argv[1], sys.argv[2], int(sys.argv[3])
QUERIES = [
    ("SELECT id, name, budget, status FROM campaigns WHERE company_id = %(c)s ORDER BY id", True),
    ("SELECT campaign_id, sum(clicks), count(*) FROM ads WHERE company_id = %(c)s GROUP BY campaign_id", False),
    ("SELECT ca.name, a.title, a.clicks FROM campaigns ca JOIN ads a ON a.company_id = ca.company_id "
     "AND a.campaign_id = ca.id WHERE ca.company_id = %(c)s AND a.company_id = %(c)s ORDER BY a.id", True),
    ("SELECT t.name, count(*) FROM ads a JOIN ad_types t ON t.id = a.ad_type_id WHERE a.company_id = %(c)s "
     "GROUP BY t.name ORDER BY t.name", True),
    ("WITH s AS (SELECT campaign_id, max(clicks) AS m FROM ads WHERE company_id = %(c)s GROUP BY 1) "
     "SELECT campaign_id, m, rank() OVER (ORDER BY m DESC NULLS LAST, campaign_id) FROM s ORDER BY 1", True),
    ("SELECT * FROM companies WHERE id = %(c)s", False),
    ("SELECT id, name FROM ad_types ORDER BY id", True),
]
bad = []

def norm(rows, ordered):
    return rows if ordered else sorted(rows, key=repr)

def fetch(conn, sql, params, ordered, **kw):
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params, **kw)
            return norm(cur.fetchall(), ordered)
    except psycopg.Error as e:
        return f"ERROR {e.sqlstate} {e}"

with psycopg.connect(router_dsn, autocommit=True) as r, psycopg.connect(plain_dsn, autocommit=True) as p:
    for c in range(1, tenants + 1):
        for sql, ordered in QUERIES:
            params = {"c": c}
            for mode, kw in (("bound", {}), ("prepared", {"prepare": True})):
                got, want = fetch(r, sql, params, ordered, **kw), fetch(p, sql, params, ordered, **kw)
                if isinstance(want, str):
                    bad.append(f"{mode} c={c}: {sql}\n  fails on plain Postgres: {want}")
                elif got != want:
                    bad.append(f"{mode} c={c}: {sql}\n  router: {got!r}\n  plain:  {want!r}")
            try:
                got = norm(psycopg.ClientCursor(r).execute(sql, params).fetchall(), ordered)
            except psycopg.Error as e:
                got = f"ERROR {e.sqlstate} {e}"
            want = norm(psycopg.ClientCursor(p).execute(sql, params).fetchall(), ordered)
            if got != want:
                bad.append(f"client-side c={c}: {sql}\n  router: {got!r}\n  plain:  {want!r}")
    # Transactions of one tenant: one rolled back, one committed.
    for commit in (False, True):
        c = 2
        results = []
        for conn in (r, p):
            out = []
            try:
                with conn.transaction(force_rollback=not commit):
                    with conn.cursor() as cur:
                        cur.execute("UPDATE ads SET clicks = clicks + 1000 WHERE company_id = %s "
                                    "AND campaign_id = %s RETURNING id, clicks", (c, c * 100 + 7))
                        out.append(sorted(cur.fetchall()))
                        cur.execute("SELECT sum(clicks) FROM ads WHERE company_id = %s", (c,))
                        out.append(cur.fetchall())
            except psycopg.Error as e:
                out.append(f"ERROR {e.sqlstate} {e}")
            with conn.cursor() as cur:
                cur.execute("SELECT sum(clicks) FROM ads WHERE company_id = %s", (c,))
                out.append(cur.fetchall())
            results.append(out)
        if any(isinstance(x, str) for x in results[1]):
            bad.append(f"transaction commit={commit} fails on plain Postgres: {results[1]!r}")
        elif results[0] != results[1]:
            bad.append(f"transaction commit={commit}\n  router: {results[0]!r}\n  plain:  {results[1]!r}")

if bad:
    print("\n".join(bad))
    sys.exit(1)
print("OK")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_single_tenant_statements_match_plain_postgres() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .output();
    if !matches!(&have, Ok(o) if o.status.success()) {
        eprintln!("SKIPPED: python3 with psycopg 3 is not available");
        return;
    }
    let f = Fixture::new().await;
    let out = tokio::process::Command::new("python3")
        .args(["-c", PSYCOPG_CHECK])
        .arg(f.env.conn_str("postgres"))
        .arg(&f.plain_str)
        .arg(TENANTS.to_string())
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "psycopg check failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    f.assert_same_tables(&f.router().await).await;
}

// ---------------------------------------------------------------------------------
// Planner swap under load
// ---------------------------------------------------------------------------------

/// The same component with a custom section appended: another build (content hash),
/// the same behaviour.
fn rebuilt(bytes: &[u8], tag: u32) -> Vec<u8> {
    let name = b"shardgate-test-build";
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(&tag.to_le_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    out.push(content.len() as u8); // LEB128 size, < 128
    out.extend_from_slice(&content);
    out
}

/// The planner components that ship: (plugin name, file name, bytes).
fn planners() -> Vec<(&'static str, String, &'static [u8])> {
    vec![
        (
            "planner-fastpath",
            "planner_fastpath.wasm".into(),
            builtin::PLANNER_FASTPATH,
        ),
        (
            "planner-router",
            "planner_router.wasm".into(),
            builtin::PLANNER_ROUTER,
        ),
    ]
}

/// Resident memory of this process (the router runs in it), for the log.
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

const SWAPS: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planner_swaps_under_load_fail_no_statement() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for (_, file, bytes) in planners() {
        std::fs::write(dir.path().join(&file), rebuilt(bytes, 0)).unwrap();
    }
    let f = Arc::new(
        Fixture::with(EnvOptions {
            pool_size: 12,
            extra: format!(
                "[plugins]\ndir = \"{}\"\ncache_dir = \"{}\"\ncall_timeout_ms = 1000\n",
                dir.path().display(),
                cache.path().display()
            ),
            ..Default::default()
        })
        .await,
    );
    // Expected answers, from plain Postgres.
    let sqls = [
        "SELECT count(*), sum(clicks) FROM ads WHERE company_id = {c}",
        "SELECT name, budget FROM campaigns WHERE company_id = {c} AND id = {c} * 100 + 3",
        "SELECT ca.name, sum(a.clicks) FROM campaigns ca JOIN ads a ON a.company_id = ca.company_id \
         AND a.campaign_id = ca.id WHERE ca.company_id = {c} AND a.company_id = {c} \
         GROUP BY ca.name ORDER BY ca.name",
        "UPDATE companies SET country = country WHERE id = {c} RETURNING id, country",
    ];
    let mut want = BTreeMap::new();
    for (i, s) in sqls.iter().enumerate() {
        for c in 1..=TENANTS {
            let st = simple(&f.plain, &bind_simple(s, c)).await.unwrap();
            let ex = extended(&f.plain, &bind_ext(s), &[&c]).await.unwrap();
            want.insert((i, c), (st.rows, ex.rows));
        }
    }
    let want = Arc::new(want);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..6usize {
        let (f, want, stop, done) = (f.clone(), want.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let r = f.router().await;
            let prepared: Vec<_> = {
                let mut v = Vec::new();
                for s in sqls {
                    v.push(r.prepare(&bind_ext(s)).await.map_err(|e| show(&e))?);
                }
                v
            };
            // The first few failures, and how many (bounded: a broken fleet must not
            // fill memory with messages).
            let mut failures = Vec::new();
            let mut failed = 0usize;
            let mut fail = |m: String| {
                failed += 1;
                if failures.len() < 5 {
                    failures.push(m);
                }
            };
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let c = (i as i64 + task as i64) % TENANTS + 1;
                let k = i % sqls.len();
                let expect = &want[&(k, c)];
                // Alternate the simple protocol and a statement prepared before swaps.
                let is_simple = (i + task).is_multiple_of(2);
                let expect = if is_simple { &expect.0 } else { &expect.1 };
                let got = if is_simple {
                    simple(&r, &bind_simple(sqls[k], c)).await.map(|a| a.rows)
                } else {
                    r.query(&prepared[k], &[&c]).await.map(|rows| {
                        rows.iter()
                            .map(|row| (0..row.len()).map(|j| cell(row, j)).collect::<Vec<_>>())
                            .collect()
                    })
                };
                match got {
                    Ok(rows) if rows != *expect => {
                        fail(format!("c={c} {}: {rows:?} != {expect:?}", sqls[k]))
                    }
                    Ok(_) => {}
                    Err(e) => fail(format!("c={c} {}: {}", sqls[k], show(&e))),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            if failed == 0 {
                Ok(())
            } else {
                Err(format!("{failed} failures, first: {}", failures.join("\n")))
            }
        }));
    }
    let admin = f.router().await;
    let started = Instant::now();
    eprintln!("before the swaps: router process {}", rss());
    let mut swaps = 0;
    let mut builds: BTreeMap<&str, Option<String>> = BTreeMap::new();
    // Builds 1 and 2 by turns: each swap replaces the loaded build; the first two are
    // compiled (slow in a debug build), the others come from the compilation cache.
    while swaps < SWAPS {
        swaps += 1;
        for (_, file, bytes) in planners() {
            std::fs::write(dir.path().join(&file), rebuilt(bytes, 2 - swaps % 2)).unwrap();
        }
        let report = simple(&admin, "SELECT * FROM shardgate_reload_plugins()")
            .await
            .unwrap_or_else(|e| panic!("reload: {}", show(&e)));
        for (name, _, _) in planners() {
            let line = report
                .rows
                .iter()
                .find(|r| r[0].as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{name} in the report: {report:?}"));
            // Replaced by this call, or already by the router's file watcher (it polls
            // the directory): either way the loaded build must be the new one.
            assert!(
                matches!(line[2].as_deref(), Some("replaced" | "unchanged")),
                "{report:?}"
            );
            let build = builds.entry(name).or_default();
            assert_ne!(
                line[3], *build,
                "{name}: the new build is loaded: {report:?}"
            );
            *build = line[3].clone();
        }
        // Let the load go on for a while with the new build before the next swap.
        let before = done.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::Relaxed) < before + 500 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "swap {swaps} at {:.1} s: {} statements so far, router process {}",
            started.elapsed().as_secs_f64(),
            done.load(Ordering::Relaxed),
            rss()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    let n = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "statements failed during planner swaps:\n{}",
        failures.join("\n")
    );
    assert!(n > 100, "statements run during the swaps: {n}");
    eprintln!(
        "{swaps} planner swaps, {n} statements, 0 failed, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    f.assert_same_tables(&admin).await;
}
