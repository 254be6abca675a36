//! Moving rows between the coordinator's table and its shards, streamed in COPY text
//! format (never the whole table in memory).
//!
//! Into hash shards: the coordinator streams `COPY (SELECT key, cols...) TO STDOUT`;
//! the router hashes the first field of each row with the table's distribution plugin,
//! replaces it with the shard index and streams the row to the node of that shard, into
//! a staging table; each node then moves the staged rows into its shards with one
//! INSERT ... SELECT per shard. One connection per node, whatever the shard count.

use super::AdminError;
use super::fleet::Fleet;
use super::shape::quote_ident;
use crate::plugin::{DistributionPlugin, Value, ValueType};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use tokio_postgres::{Client, CopyInSink};

/// Bytes gathered per node before they are sent.
const CHUNK: usize = 64 * 1024;

/// A shard as the data move sees it.
pub struct ShardDest {
    pub index: i32,
    /// The shard's schema (unquoted): the staging table goes beside it.
    pub schema: String,
    /// Qualified, quoted shard table name.
    pub table: String,
    pub groups: Vec<i32>,
}

struct Dest {
    sink: Pin<Box<CopyInSink<Bytes>>>,
    buf: BytesMut,
    addr: String,
}

async fn open_sink(client: &Client, addr: &str, sql: &str) -> Result<Dest, AdminError> {
    let sink = client
        .copy_in(sql)
        .await
        .map_err(|e| AdminError::on(addr, e))?;
    Ok(Dest {
        sink: Box::pin(sink),
        buf: BytesMut::with_capacity(CHUNK),
        addr: addr.to_owned(),
    })
}

impl Dest {
    async fn flush_if_full(&mut self) -> Result<(), AdminError> {
        if self.buf.len() >= CHUNK {
            let b = self.buf.split().freeze();
            self.sink
                .send(b)
                .await
                .map_err(|e| AdminError::on(&self.addr, e))?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, AdminError> {
        if !self.buf.is_empty() {
            let b = self.buf.split().freeze();
            self.sink
                .send(b)
                .await
                .map_err(|e| AdminError::on(&self.addr, e))?;
        }
        self.sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| AdminError::on(&self.addr, e))
    }
}

/// Moves every row of `source` (on the coordinator) into the hash shards. Returns the
/// number of rows moved.
#[allow(clippy::too_many_arguments)]
pub async fn into_hash_shards(
    coord: &Client,
    fleet: &Fleet,
    source: &str,
    key: &str,
    key_type: ValueType,
    columns: &str,
    plugin: &DistributionPlugin,
    shards: &[ShardDest],
    stage_name: &str,
) -> Result<u64, AdminError> {
    let shard_count = shards.len() as u32;
    let mut groups: Vec<i32> = shards.iter().flat_map(|s| s.groups.clone()).collect();
    groups.sort_unstable();
    groups.dedup();
    // A staging table per node, next to the shards (the schema exists there).
    let stage_of = |g: i32| -> String {
        let s = shards
            .iter()
            .find(|s| s.groups.contains(&g))
            .expect("group has a shard");
        super::shape::qualified(&s.schema, stage_name)
    };
    let mut dests: HashMap<i32, Dest> = HashMap::new();
    for &g in &groups {
        let n = fleet.node(g).expect("fleet holds every group");
        let first = shards
            .iter()
            .find(|s| s.groups.contains(&g))
            .expect("group has a shard");
        let stage = stage_of(g);
        fleet
            .exec(
                g,
                &format!(
                    "CREATE TABLE {stage} AS SELECT 0::int AS sg_shard, {columns} FROM {} WITH NO DATA",
                    first.table
                ),
            )
            .await?;
        let d = open_sink(
            &n.client,
            &n.addr,
            &format!("COPY {stage} (sg_shard, {columns}) FROM STDIN"),
        )
        .await?;
        dests.insert(g, d);
    }
    let by_index: HashMap<i32, &ShardDest> = shards.iter().map(|s| (s.index, s)).collect();
    let out = coord
        .copy_out(&format!(
            "COPY (SELECT {}, {columns} FROM ONLY {source}) TO STDOUT",
            quote_ident(key)
        ))
        .await
        .map_err(|e| AdminError::on("coordinator", e))?;
    let mut out = Box::pin(out);
    let mut rows = 0u64;
    while let Some(row) = out.next().await {
        let row = row.map_err(|e| AdminError::on("coordinator", e))?;
        let tab = row.iter().position(|&b| b == b'\t').unwrap_or(row.len());
        let value = decode_key(&row[..tab], key_type, key)?;
        let idx = plugin.shard_index(&value, shard_count)? as i32;
        let shard = by_index.get(&idx).ok_or_else(|| {
            AdminError::Plugin(crate::plugin::PluginError::Invalid {
                name: plugin.name().to_owned(),
                reason: format!("shard index {idx} of {shard_count}"),
            })
        })?;
        for g in &shard.groups {
            let d = dests.get_mut(g).expect("dest per group");
            d.buf.put_slice(idx.to_string().as_bytes());
            d.buf.put_slice(&row[tab..]);
            d.flush_if_full().await?;
        }
        rows += 1;
    }
    for (_, d) in dests.drain() {
        d.finish().await?;
    }
    for &g in &groups {
        let stage = stage_of(g);
        let mut sql = String::new();
        for s in shards.iter().filter(|s| s.groups.contains(&g)) {
            sql.push_str(&format!(
                "INSERT INTO {} ({columns}) SELECT {columns} FROM {stage} WHERE sg_shard = {};",
                s.table, s.index
            ));
        }
        sql.push_str(&format!("DROP TABLE {stage};"));
        fleet.exec(g, &sql).await?;
    }
    Ok(rows)
}

/// Copies every row of `source` on `from` into `dest` on each of the fleet's `groups`.
pub async fn copy_table(
    from: &Client,
    from_name: &str,
    source: &str,
    columns: &str,
    fleet: &Fleet,
    groups: &[i32],
    dest: &str,
) -> Result<u64, AdminError> {
    let mut dests = Vec::new();
    for &g in groups {
        let n = fleet.node(g).expect("fleet holds every group");
        dests.push(
            open_sink(
                &n.client,
                &n.addr,
                &format!("COPY {dest} ({columns}) FROM STDIN"),
            )
            .await?,
        );
    }
    let out = from
        .copy_out(&format!("COPY (SELECT {columns} FROM {source}) TO STDOUT"))
        .await
        .map_err(|e| AdminError::on(from_name, e))?;
    let mut out = Box::pin(out);
    let mut rows = 0u64;
    while let Some(row) = out.next().await {
        let row = row.map_err(|e| AdminError::on(from_name, e))?;
        for d in &mut dests {
            d.buf.put_slice(&row);
            d.flush_if_full().await?;
        }
        rows += 1;
    }
    for d in dests {
        d.finish().await?;
    }
    Ok(rows)
}

/// Copies `source` (a shard, on a worker) into `dest` on the coordinator.
pub async fn copy_back(
    from: &Client,
    from_name: &str,
    source: &str,
    coord: &Client,
    dest: &str,
    columns: &str,
) -> Result<u64, AdminError> {
    let mut d = open_sink(
        coord,
        "coordinator",
        &format!("COPY {dest} ({columns}) FROM STDIN"),
    )
    .await?;
    let out = from
        .copy_out(&format!("COPY (SELECT {columns} FROM {source}) TO STDOUT"))
        .await
        .map_err(|e| AdminError::on(from_name, e))?;
    let mut out = Box::pin(out);
    while let Some(row) = out.next().await {
        let row = row.map_err(|e| AdminError::on(from_name, e))?;
        d.buf.put_slice(&row);
        d.flush_if_full().await?;
    }
    d.finish().await
}

/// A distribution value in COPY text format -> the plugin's value.
pub fn decode_key(field: &[u8], t: ValueType, column: &str) -> Result<Value, AdminError> {
    if field == b"\\N" {
        return Err(AdminError::NullValue(format!(
            "cannot distribute a row with NULL in the distribution column \"{column}\""
        )));
    }
    let text = unescape(field);
    parse_value(&text, t)
}

/// A value given as text (a literal, an admin function's argument) -> the plugin's value.
pub fn parse_value(text: &str, t: ValueType) -> Result<Value, AdminError> {
    let bad = |ty: &str| {
        AdminError::InvalidText(format!("invalid input syntax for type {ty}: \"{text}\""))
    };
    // Postgres's input functions skip the C locale's spaces only.
    let s = text.trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    // As Postgres says it: a number too large for the type is out of range (22003),
    // anything else that is not an integer is invalid input (22P02).
    let int = |ty: &str, e: std::num::ParseIntError| {
        use std::num::IntErrorKind::{NegOverflow, PosOverflow};
        match e.kind() {
            PosOverflow | NegOverflow => {
                AdminError::OutOfRange(format!("value \"{text}\" is out of range for type {ty}"))
            }
            _ => bad(ty),
        }
    };
    Ok(match t {
        ValueType::Int2 => Value::Int2(s.parse().map_err(|e| int("smallint", e))?),
        ValueType::Int4 => Value::Int4(s.parse().map_err(|e| int("integer", e))?),
        ValueType::Int8 => Value::Int8(s.parse().map_err(|e| int("bigint", e))?),
        ValueType::Text | ValueType::Varchar => Value::Text(text.to_owned()),
        ValueType::Boolean => Value::Boolean(pg_bool(s).ok_or_else(|| bad("boolean"))?),
        ValueType::Uuid => {
            let hex: String = s
                .trim_start_matches('{')
                .trim_end_matches('}')
                .chars()
                .filter(|c| *c != '-')
                .collect();
            if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad("uuid"));
            }
            let bytes = (0..16)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad("uuid")))
                .collect::<Result<Vec<u8>, _>>()?;
            Value::Uuid(bytes)
        }
    })
}

/// A boolean as Postgres reads one: any prefix of true / false / yes / no, `on` /
/// `off` from two letters on, `1` / `0`; in any case.
fn pg_bool(s: &str) -> Option<bool> {
    let l = s.to_ascii_lowercase();
    let prefix = |word: &str, min: usize| l.len() >= min && word.starts_with(l.as_str());
    if prefix("true", 1) || prefix("yes", 1) || prefix("on", 2) || l == "1" {
        Some(true)
    } else if prefix("false", 1) || prefix("no", 1) || prefix("off", 2) || l == "0" {
        Some(false)
    } else {
        None
    }
}

/// Undoes COPY text-format escapes (`\\`, `\t`, `\n`, octal, `\x` hex...).
fn unescape(field: &[u8]) -> String {
    if !field.contains(&b'\\') {
        return String::from_utf8_lossy(field).into_owned();
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 >= field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = field[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (c - b'0') as u32;
                for _ in 0..2 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                if n == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_copy_text() {
        assert_eq!(unescape(b"a\\tb\\nc\\\\d"), "a\tb\nc\\d");
        assert_eq!(unescape(b"\\101\\x42"), "AB");
        assert_eq!(unescape(b"plain"), "plain");
    }

    #[test]
    fn parses_values() {
        assert!(matches!(
            parse_value("42", ValueType::Int8),
            Ok(Value::Int8(42))
        ));
        assert!(parse_value("x", ValueType::Int4).is_err());
        assert!(matches!(
            parse_value("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", ValueType::Uuid),
            Ok(Value::Uuid(b)) if b.len() == 16 && b[0] == 0xa0
        ));
        assert!(matches!(
            decode_key(b"\\N", ValueType::Int4, "id"),
            Err(AdminError::NullValue(_))
        ));
    }

    #[test]
    fn reads_integers_and_booleans_as_postgres_does() {
        let int4 = |s: &str| parse_value(s, ValueType::Int4);
        assert!(matches!(int4(" +7\n"), Ok(Value::Int4(7))));
        assert!(matches!(int4("-2147483648"), Ok(Value::Int4(i32::MIN))));
        // Too large: out of range (22003), as int4in says; not a number: 22P02.
        assert!(
            matches!(int4("2147483648"), Err(AdminError::OutOfRange(m)) if m == "value \"2147483648\" is out of range for type integer")
        );
        assert!(matches!(
            int4("-99999999999999999999"),
            Err(AdminError::OutOfRange(_))
        ));
        assert!(matches!(int4("1.5"), Err(AdminError::InvalidText(_))));
        assert!(matches!(int4(""), Err(AdminError::InvalidText(_))));
        // A no-break space is not a C-locale space: Postgres refuses it.
        assert!(int4("\u{a0}7").is_err());
        let b = |s: &str| match parse_value(s, ValueType::Boolean) {
            Ok(Value::Boolean(v)) => Some(v),
            _ => None,
        };
        for (s, want) in [
            ("t", Some(true)),
            ("TR", Some(true)),
            ("yes", Some(true)),
            (" on ", Some(true)),
            ("1", Some(true)),
            ("fal", Some(false)),
            ("N", Some(false)),
            ("of", Some(false)),
            ("OFF", Some(false)),
            ("0", Some(false)),
            ("o", None),
            ("truex", None),
            ("", None),
            ("10", None),
        ] {
            assert_eq!(b(s), want, "{s:?}");
        }
    }
}
