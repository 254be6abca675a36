//! `hash-pg-partition`: Postgres `PARTITION BY HASH` compatible. The hash is the
//! type's seeded 64-bit hash (`hashint8extended` and friends, with the partition seed)
//! combined as Postgres combines partition keys; shard k holds what a native hash
//! partition with modulus `shard_count` and remainder k would hold.

wit_bindgen::generate!({ world: "distribution", path: "../../wit/distribution" });

use exports::shardgate::distribution::hasher::{Guest, HashError, ShardScheme, Value, ValueType};
use pg_hash::HASH_PARTITION_SEED as SEED;

struct HashPgPartition;

impl Guest for HashPgPartition {
    fn name() -> String {
        "hash-pg-partition".into()
    }

    fn supported_types() -> Vec<ValueType> {
        vec![
            ValueType::Int2,
            ValueType::Int4,
            ValueType::Int8,
            ValueType::Text,
            ValueType::Varchar,
            ValueType::Uuid,
            ValueType::Boolean,
        ]
    }

    fn scheme() -> ShardScheme {
        ShardScheme::Modulo
    }

    fn hash(v: Value) -> Result<i64, HashError> {
        let h = match v {
            Value::Int2(x) => pg_hash::hashint2extended(x, SEED),
            Value::Int4(x) => pg_hash::hashint4extended(x, SEED),
            Value::Int8(x) => pg_hash::hashint8extended(x, SEED),
            Value::Text(s) => pg_hash::hashtextextended(&s, SEED),
            Value::Uuid(b) => {
                let b: [u8; 16] = b
                    .try_into()
                    .map_err(|_| HashError::Invalid("a uuid is 16 bytes".into()))?;
                pg_hash::uuid_hash_extended(&b, SEED)
            }
            Value::Boolean(x) => pg_hash::hashboolextended(x, SEED),
        };
        // One key column: Postgres combines it into a zero row hash.
        Ok(pg_hash::hash_combine64(0, h) as i64)
    }
}

export!(HashPgPartition);
