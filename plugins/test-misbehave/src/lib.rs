//! A distribution plugin for the host's tests: it misbehaves on request. Text values
//! choose how: "loop" spins forever, "alloc" allocates without bound, "trap" panics
//! (a trap, with panic = abort), "nonsense" returns a hash outside int32 although the
//! plugin declares Citus's hash ranges, "reject" returns an error of its own. Any other
//! value is hashed like hash-citus.

wit_bindgen::generate!({ world: "distribution", path: "../../wit/distribution" });

use exports::shardgate::distribution::hasher::{Guest, HashError, ShardScheme, Value, ValueType};

struct Misbehave;

impl Guest for Misbehave {
    fn name() -> String {
        "test-misbehave".into()
    }

    fn supported_types() -> Vec<ValueType> {
        vec![ValueType::Text, ValueType::Int8]
    }

    fn scheme() -> ShardScheme {
        ShardScheme::HashRanges
    }

    fn hash(v: Value) -> Result<i64, HashError> {
        match v {
            Value::Text(s) => match s.as_str() {
                "loop" => {
                    let mut x: u64 = 1;
                    loop {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
                "alloc" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "trap" => panic!("asked to trap"),
                "nonsense" => Ok(i64::MAX),
                "reject" => Err(HashError::Unsupported("rejected on request".into())),
                other => Ok(pg_hash::hashtext(other) as i64),
            },
            Value::Int8(x) => Ok(pg_hash::hashint8(x) as i64),
            _ => Err(HashError::Unsupported("only text and int8".into())),
        }
    }
}

export!(Misbehave);
