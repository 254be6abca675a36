//! The distribution hashes against a real Postgres: every supported type, thousands of
//! random and edge values, the 32-bit functions Citus uses and the seeded 64-bit ones
//! `PARTITION BY HASH` uses (`satisfies_hash_partition`).

use pg_hash::*;
use shardgate_tests::TestEnv;

const N: usize = 3000;

fn edge_ints() -> Vec<i64> {
    let mut v = vec![0, 1, -1, 2, -2, 42, 255, 256, 65535, 65536];
    for b in [
        i16::MIN as i64,
        i16::MAX as i64,
        i32::MIN as i64,
        i32::MAX as i64,
        i64::MIN,
        i64::MAX,
    ] {
        v.extend([b, b.saturating_add(1), b.saturating_sub(1)]);
    }
    v.extend((0..63).map(|s| 1i64 << s));
    v.extend((0..63).map(|s| -(1i64 << s)));
    v
}

fn random_text(len: usize) -> String {
    const ALPHABET: &[char] = &[
        'a', 'Z', '0', ' ', 'é', 'ß', '漢', '🦀', '\'', '\\', '"', 'x', '\u{7f}',
    ];
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_hashes_match_postgres() {
    let env = TestEnv::new().await;
    let c = env.direct().await;
    let mut vals = edge_ints();
    vals.extend((0..N).map(|_| rand::random::<i64>()));
    vals.extend((0..N).map(|_| rand::random_range(-100_000i64..100_000)));
    let seed = rand::random::<i64>();
    let rows = c
        .query(
            "SELECT v, hashint8(v), hashint8extended(v, $2), hashint8extended(v, 0),
                    CASE WHEN v BETWEEN -2147483648 AND 2147483647 THEN hashint4(v::int4) END,
                    CASE WHEN v BETWEEN -32768 AND 32767 THEN hashint2(v::int2) END,
                    CASE WHEN v BETWEEN -2147483648 AND 2147483647 THEN hashint4extended(v::int4, $2) END
             FROM unnest($1::int8[]) v",
            &[&vals, &seed],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), vals.len());
    for r in rows {
        let v: i64 = r.get(0);
        assert_eq!(hashint8(v), r.get::<_, i32>(1), "hashint8({v})");
        assert_eq!(
            hashint8extended(v, seed as u64) as i64,
            r.get::<_, i64>(2),
            "hashint8extended({v}, {seed})"
        );
        assert_eq!(
            hashint8extended(v, 0) as i64,
            r.get::<_, i64>(3),
            "hashint8extended({v}, 0)"
        );
        if let Some(h) = r.get::<_, Option<i32>>(4) {
            assert_eq!(hashint4(v as i32), h, "hashint4({v})");
        }
        if let Some(h) = r.get::<_, Option<i32>>(5) {
            assert_eq!(hashint2(v as i16), h, "hashint2({v})");
        }
        if let Some(h) = r.get::<_, Option<i64>>(6) {
            assert_eq!(
                hashint4extended(v as i32, seed as u64) as i64,
                h,
                "hashint4extended({v})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_uuid_bool_hashes_match_postgres() {
    let env = TestEnv::new().await;
    let c = env.direct().await;
    let mut texts: Vec<String> = vec![
        String::new(),
        "a".into(),
        "abc".into(),
        "x".repeat(11),
        "x".repeat(12),
        "x".repeat(13),
        "y".repeat(1000),
    ];
    texts.extend((0..N).map(|i| random_text(i % 40)));
    let seed = rand::random::<i64>();
    let rows = c
        .query(
            "SELECT v, hashtext(v), hashtextextended(v, $2), hashtext(v::varchar::text) FROM unnest($1::text[]) v",
            &[&texts, &seed],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), texts.len());
    for r in rows {
        let v: &str = r.get(0);
        assert_eq!(hashtext(v), r.get::<_, i32>(1), "hashtext({v:?})");
        assert_eq!(
            hashtextextended(v, seed as u64) as i64,
            r.get::<_, i64>(2),
            "hashtextextended({v:?})"
        );
        assert_eq!(hashtext(v), r.get::<_, i32>(3), "hashtext of varchar {v:?}");
    }
    let uuids: Vec<String> = (0..N)
        .map(|_| {
            let b: [u8; 16] = rand::random();
            b.iter().map(|x| format!("{x:02x}")).collect()
        })
        .chain([
            "00000000000000000000000000000000".to_string(),
            "ffffffffffffffffffffffffffffffff".to_string(),
        ])
        .collect();
    let rows = c
        .query(
            "SELECT v, uuid_hash(v::uuid), uuid_hash_extended(v::uuid, $2) FROM unnest($1::text[]) v",
            &[&uuids, &seed],
        )
        .await
        .unwrap();
    for r in rows {
        let v: &str = r.get(0);
        let mut b = [0u8; 16];
        for i in 0..16 {
            b[i] = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap();
        }
        assert_eq!(uuid_hash(&b), r.get::<_, i32>(1), "uuid_hash({v})");
        assert_eq!(
            uuid_hash_extended(&b, seed as u64) as i64,
            r.get::<_, i64>(2),
            "uuid_hash_extended({v})"
        );
    }
    // bool's hash opclass uses hashchar/hashcharextended on 0/1.
    let proc: String = c
        .query_one(
            "SELECT p.amproc::regproc::text FROM pg_amproc p JOIN pg_opfamily f ON f.oid = p.amprocfamily
             JOIN pg_am a ON a.oid = f.opfmethod
             WHERE a.amname = 'hash' AND f.opfname = 'bool_ops' AND p.amprocnum = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(proc, "hashchar");
    let r = c
        .query_one(
            "SELECT hashchar(1::int4::\"char\"), hashchar(0::int4::\"char\"), hashcharextended(1::int4::\"char\", $1)",
            &[&seed],
        )
        .await
        .unwrap();
    assert_eq!(hashbool(true), r.get::<_, i32>(0));
    assert_eq!(hashbool(false), r.get::<_, i32>(1));
    assert_eq!(
        hashboolextended(true, seed as u64) as i64,
        r.get::<_, i64>(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_remainders_match_native_hash_partitions() {
    let env = TestEnv::new().await;
    let c = env.direct().await;
    for (ty, modulus) in [("int8", 8i32), ("int4", 5), ("text", 7), ("uuid", 4)] {
        c.batch_execute(&format!(
            "CREATE TABLE p_{ty} (k {ty}) PARTITION BY HASH (k)"
        ))
        .await
        .unwrap();
        let vals: Vec<String> = (0..1000)
            .map(|i| match ty {
                "int8" => (rand::random::<i64>() / (i + 1)).to_string(),
                "int4" => rand::random::<i32>().to_string(),
                "text" => random_text(i as usize % 30),
                _ => {
                    let b: [u8; 16] = rand::random();
                    b.iter().map(|x| format!("{x:02x}")).collect()
                }
            })
            .collect();
        let oid: u32 = c
            .query_one(&format!("SELECT 'p_{ty}'::regclass::oid"), &[])
            .await
            .unwrap()
            .get(0);
        let rows = c
            .query(
                &format!(
                    "SELECT v, r FROM unnest($1::text[]) v, generate_series(0, {m}) r
                     WHERE satisfies_hash_partition({oid}, {modulus}, r, v::{ty})",
                    m = modulus - 1
                ),
                &[&vals],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.len(),
            vals.len(),
            "each {ty} value in exactly one partition"
        );
        for r in rows {
            let v: &str = r.get(0);
            let want: i32 = r.get(1);
            let h = match ty {
                "int8" => hashint8extended(v.parse().unwrap(), HASH_PARTITION_SEED),
                "int4" => hashint4extended(v.parse().unwrap(), HASH_PARTITION_SEED),
                "text" => hashtextextended(v, HASH_PARTITION_SEED),
                _ => {
                    let mut b = [0u8; 16];
                    for i in 0..16 {
                        b[i] = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap();
                    }
                    uuid_hash_extended(&b, HASH_PARTITION_SEED)
                }
            };
            assert_eq!(partition_for(h, modulus as u64), want as u64, "{ty} {v:?}");
        }
    }
}

#[test]
fn citus_ranges_cover_the_int32_space() {
    for n in [1u32, 2, 3, 7, 32, 1000] {
        let mut expect = i32::MIN as i64;
        for i in 0..n {
            let (lo, hi) = citus_shard_range(i, n);
            assert_eq!(lo as i64, expect);
            assert_eq!(citus_shard_index(lo, n), i);
            assert_eq!(citus_shard_index(hi, n), i);
            expect = hi as i64 + 1;
        }
        assert_eq!(expect, i32::MAX as i64 + 1);
    }
    // Citus's 32-shard layout starts its second shard at -2013265920.
    assert_eq!(citus_shard_range(1, 32).0, -2013265920);
}
