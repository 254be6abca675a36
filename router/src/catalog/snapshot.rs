//! One consistent, immutable view of the catalog: nodes, colocation groups, distributed
//! and reference tables with their shards and placements.

use crate::plugin::ValueType;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct NodeRow {
    pub node_id: i32,
    pub group_id: i32,
    pub name: String,
    pub port: i32,
    pub is_active: bool,
    pub role: String,
    pub should_have_shards: bool,
}

impl NodeRow {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.name, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Hash-distributed (`partmethod = 'h'`).
    Hash,
    /// A reference table (`partmethod = 'n'`): one shard, a placement on every node.
    Reference,
}

#[derive(Clone, Debug)]
pub struct Colocation {
    pub id: i32,
    pub shard_count: i32,
    pub replication_factor: i32,
    pub column_type: u32,
    pub plugin: Option<String>,
    pub plugin_hash: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Shard {
    pub id: i64,
    pub index: i32,
    pub min: Option<String>,
    pub max: Option<String>,
    /// Group ids of the nodes that hold a placement.
    pub placements: Vec<i32>,
}

#[derive(Clone, Debug)]
pub struct TableMeta {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub method: Method,
    /// The distribution column (hash-distributed tables).
    pub column: Option<String>,
    pub column_type: u32,
    pub colocation_id: i32,
    /// Distribution plugin name and content hash.
    pub plugin: Option<String>,
    pub plugin_hash: Option<String>,
    /// Ordered by shard index.
    pub shards: Vec<Shard>,
    /// Column names in table order (dropped columns left out).
    pub columns: Vec<String>,
    /// Every shard's name as shard SQL writes it (`"schema"."t_102008"`), by shard
    /// index; made on first use (`qualified_shard`).
    pub qualified: std::sync::OnceLock<Vec<String>>,
}

impl TableMeta {
    /// The shard table's name for shard id `id` (unquoted).
    pub fn shard_name(&self, id: i64) -> String {
        shard_name(&self.name, id)
    }

    /// The shard of index `index`, schema-qualified and quoted for shard SQL.
    pub fn qualified_shard(&self, index: usize) -> Option<&str> {
        self.qualified
            .get_or_init(|| {
                let schema = crate::plan::quote_ident(&self.schema);
                self.shards
                    .iter()
                    .map(|s| {
                        format!(
                            "{schema}.{}",
                            crate::plan::quote_ident(&self.shard_name(s.id))
                        )
                    })
                    .collect()
            })
            .get(index)
            .map(String::as_str)
    }
}

/// `<name>_<shardid>`, as Citus names shards and their indexes and constraints. A
/// name that would pass Postgres's 63-byte limit is cut and given a hash of the whole
/// name, so that the shards of one long name stay distinct.
pub fn shard_name(name: &str, id: i64) -> String {
    const MAX: usize = 63;
    let suffix = format!("_{id}");
    if name.len() + suffix.len() <= MAX {
        return format!("{name}{suffix}");
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let hash = format!("{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3]);
    let mut keep = MAX - suffix.len() - hash.len() - 1;
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}_{hash}{suffix}", &name[..keep])
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_names_are_cut_with_a_hash() {
        assert_eq!(super::shard_name("orders", 102008), "orders_102008");
        let long = "x".repeat(62);
        let a = super::shard_name(&long, 102008);
        assert!(a.len() <= 63 && a.ends_with("_102008"), "{a}");
        let other = format!("{}y", "x".repeat(61));
        assert_ne!(super::shard_name(&other, 102008), a);
        let accents = "é".repeat(40);
        assert!(super::shard_name(&accents, 1).len() <= 63);
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    /// `catalog_state.version`; 0 until first loaded.
    pub version: i64,
    pub nodes: Vec<NodeRow>,
    pub colocations: HashMap<i32, Colocation>,
    /// By the shell table's oid on the coordinator.
    pub tables: HashMap<u32, Arc<TableMeta>>,
    /// Relation name (unqualified) -> oids: a cheap first test whether a statement may
    /// touch a distributed or reference table.
    pub names: HashMap<String, Vec<u32>>,
    /// Views (plain and materialized) that read distributed or reference tables,
    /// directly or through other views, by unqualified name: on the coordinator they
    /// would read the empty shell tables.
    pub views: std::collections::HashSet<String>,
    /// Unique per loaded snapshot (0: never loaded): what may change while `version`
    /// stays (the views) changes this too. Caches of routing decisions key on it.
    pub generation: u64,
}

/// The source of `Snapshot::generation`.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The views that read distributed or reference tables, directly or through other
/// views (sorted names).
pub const VIEWS_SQL: &str = "WITH RECURSIVE dep(oid) AS (
        SELECT logicalrelid::oid FROM shardgate.pg_dist_partition
        UNION
        SELECT r.ev_class FROM dep
        JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = dep.oid
                        AND d.classid = 'pg_rewrite'::regclass
        JOIN pg_rewrite r ON r.oid = d.objid
        WHERE r.ev_class <> dep.oid
    )
    SELECT coalesce(array_agg(DISTINCT c.relname::text ORDER BY c.relname::text), '{}')
    FROM dep JOIN pg_class c ON c.oid = dep.oid WHERE c.relkind IN ('v', 'm')";

impl Snapshot {
    /// Reads the catalog in one REPEATABLE READ transaction (a consistent view).
    pub async fn load(c: &tokio_postgres::Client) -> Result<Snapshot, tokio_postgres::Error> {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let r = Self::read(c).await;
        let _ = c.batch_execute("COMMIT").await;
        r
    }

    /// Reads the catalog in the caller's transaction.
    pub async fn read(c: &tokio_postgres::Client) -> Result<Snapshot, tokio_postgres::Error> {
        let version: i64 = c
            .query_one("SELECT version FROM shardgate.catalog_state", &[])
            .await?
            .get(0);
        let nodes = c
            .query(
                "SELECT nodeid, groupid, nodename, nodeport, isactive, noderole, shouldhaveshards
                 FROM shardgate.pg_dist_node ORDER BY groupid, nodeid",
                &[],
            )
            .await?
            .iter()
            .map(|r| NodeRow {
                node_id: r.get(0),
                group_id: r.get(1),
                name: r.get(2),
                port: r.get(3),
                is_active: r.get(4),
                role: r.get(5),
                should_have_shards: r.get(6),
            })
            .collect();
        let colocations = c
            .query(
                "SELECT colocationid, shardcount, replicationfactor, distributioncolumntype,
                        distplugin, distpluginhash
                 FROM shardgate.pg_dist_colocation",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let id: i32 = r.get(0);
                (
                    id,
                    Colocation {
                        id,
                        shard_count: r.get(1),
                        replication_factor: r.get(2),
                        column_type: r.get(3),
                        plugin: r.get(4),
                        plugin_hash: r.get(5),
                    },
                )
            })
            .collect();
        let mut placements: HashMap<i64, Vec<i32>> = HashMap::new();
        for r in c
            .query(
                "SELECT shardid, groupid FROM shardgate.pg_dist_placement ORDER BY placementid",
                &[],
            )
            .await?
        {
            placements.entry(r.get(0)).or_default().push(r.get(1));
        }
        let mut shards: HashMap<u32, Vec<Shard>> = HashMap::new();
        for r in c
            .query(
                "SELECT logicalrelid::oid, shardid, shardindex, shardminvalue, shardmaxvalue
                 FROM shardgate.pg_dist_shard ORDER BY logicalrelid, shardindex",
                &[],
            )
            .await?
        {
            let id: i64 = r.get(1);
            shards.entry(r.get(0)).or_default().push(Shard {
                id,
                index: r.get(2),
                min: r.get(3),
                max: r.get(4),
                placements: placements.remove(&id).unwrap_or_default(),
            });
        }
        let mut tables = HashMap::new();
        let mut names: HashMap<String, Vec<u32>> = HashMap::new();
        for r in c
            .query(
                "SELECT p.logicalrelid::oid, n.nspname::text, c.relname::text, p.partmethod::text,
                        p.partkey, p.colocationid, p.distplugin, p.distpluginhash,
                        coalesce(a.atttypid, 0::oid),
                        ARRAY(SELECT x.attname::text FROM pg_attribute x
                              WHERE x.attrelid = p.logicalrelid AND x.attnum > 0
                                AND NOT x.attisdropped ORDER BY x.attnum)
                 FROM shardgate.pg_dist_partition p
                 JOIN pg_class c ON c.oid = p.logicalrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_attribute a ON a.attrelid = p.logicalrelid AND a.attname = p.partkey
                      AND NOT a.attisdropped",
                &[],
            )
            .await?
        {
            let oid: u32 = r.get(0);
            let method: String = r.get(3);
            let t = TableMeta {
                oid,
                schema: r.get(1),
                name: r.get(2),
                method: if method == "n" {
                    Method::Reference
                } else {
                    Method::Hash
                },
                column: r.get(4),
                colocation_id: r.get(5),
                plugin: r.get(6),
                plugin_hash: r.get(7),
                column_type: r.get(8),
                columns: r.get(9),
                shards: shards.remove(&oid).unwrap_or_default(),
                qualified: Default::default(),
            };
            names.entry(t.name.clone()).or_default().push(oid);
            tables.insert(oid, Arc::new(t));
        }
        let views: Vec<String> = c.query_one(VIEWS_SQL, &[]).await?.get(0);
        Ok(Snapshot {
            version,
            nodes,
            colocations,
            tables,
            names,
            views: views.into_iter().collect(),
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    pub fn node_by_group(&self, group: i32) -> Option<&NodeRow> {
        self.nodes
            .iter()
            .find(|n| n.group_id == group && n.role == "primary")
    }

    /// Distribution plugins that placed rows: name -> content hash (the swap rule).
    pub fn plugins_in_use(&self) -> HashMap<String, String> {
        self.tables
            .values()
            .filter_map(|t| Some((t.plugin.clone()?, t.plugin_hash.clone()?)))
            .collect()
    }
}

/// The plugin value type for a distribution column of Postgres type `oid`.
pub fn value_type_for(oid: u32) -> Option<ValueType> {
    Some(match oid {
        21 => ValueType::Int2,
        23 => ValueType::Int4,
        20 => ValueType::Int8,
        25 => ValueType::Text,
        1043 => ValueType::Varchar,
        2950 => ValueType::Uuid,
        16 => ValueType::Boolean,
        _ => return None,
    })
}
