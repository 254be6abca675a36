//! A distribution plugin for the reload tests: it names itself `hash-citus` and hashes
//! like it, except that text is lower-cased first — a "new build" whose hashes differ
//! for some values only, which a swap of an in-use plugin must refuse. Not shipped.

wit_bindgen::generate!({ world: "distribution", path: "../../wit/distribution" });

use exports::shardgate::distribution::hasher::{Guest, HashError, ShardScheme, Value, ValueType};

struct Variant;

impl Guest for Variant {
    fn name() -> String {
        "hash-citus".into()
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
        ShardScheme::HashRanges
    }

    fn hash(v: Value) -> Result<i64, HashError> {
        Ok(match v {
            Value::Int2(x) => pg_hash::hashint2(x),
            Value::Int4(x) => pg_hash::hashint4(x),
            Value::Int8(x) => pg_hash::hashint8(x),
            Value::Text(s) => pg_hash::hashtext(&s.to_lowercase()),
            Value::Uuid(b) => {
                let b: [u8; 16] = b
                    .try_into()
                    .map_err(|_| HashError::Invalid("a uuid is 16 bytes".into()))?;
                pg_hash::uuid_hash(&b)
            }
            Value::Boolean(x) => pg_hash::hashbool(x),
        } as i64)
    }
}

export!(Variant);
