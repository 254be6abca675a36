//! Postgres's hash functions, bit-compatible with a little-endian Postgres server:
//! `hash_bytes` / `hash_bytes_uint32` (Bob Jenkins' lookup3, src/common/hashfn.c) and
//! their seeded 64-bit `_extended` forms, the per-type wrappers (`hashint2/4/8`,
//! `hashtext`, `uuid_hash`, ...), Citus's shard ranges, and the combination that
//! `PARTITION BY HASH` uses. No allocation, no I/O: the same code runs natively and
//! inside the distribution plugins.
#![no_std]

const INIT: u32 = 0x9e37_79b9;
const LEN_SALT: u32 = 3_923_095;

#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline(always)]
fn finalize(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

fn le32(k: &[u8]) -> u32 {
    u32::from_le_bytes([k[0], k[1], k[2], k[3]])
}

/// lookup3 over bytes; `seed` is 0 for the 32-bit functions.
fn hash_bytes_inner(k: &[u8], seed: u64) -> (u32, u32) {
    let len = k.len() as u32;
    let (mut a, mut b, mut c) = (
        INIT.wrapping_add(len).wrapping_add(LEN_SALT),
        INIT.wrapping_add(len).wrapping_add(LEN_SALT),
        INIT.wrapping_add(len).wrapping_add(LEN_SALT),
    );
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let mut k = k;
    while k.len() >= 12 {
        a = a.wrapping_add(le32(&k[0..4]));
        b = b.wrapping_add(le32(&k[4..8]));
        c = c.wrapping_add(le32(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 0..11 bytes; the lowest byte of c is reserved for the length.
    let n = k.len();
    if n >= 11 {
        c = c.wrapping_add((k[10] as u32) << 24);
    }
    if n >= 10 {
        c = c.wrapping_add((k[9] as u32) << 16);
    }
    if n >= 9 {
        c = c.wrapping_add((k[8] as u32) << 8);
    }
    if n >= 8 {
        b = b.wrapping_add((k[7] as u32) << 24);
    }
    if n >= 7 {
        b = b.wrapping_add((k[6] as u32) << 16);
    }
    if n >= 6 {
        b = b.wrapping_add((k[5] as u32) << 8);
    }
    if n >= 5 {
        b = b.wrapping_add(k[4] as u32);
    }
    if n >= 4 {
        a = a.wrapping_add((k[3] as u32) << 24);
    }
    if n >= 3 {
        a = a.wrapping_add((k[2] as u32) << 16);
    }
    if n >= 2 {
        a = a.wrapping_add((k[1] as u32) << 8);
    }
    if n >= 1 {
        a = a.wrapping_add(k[0] as u32);
    }
    finalize(&mut a, &mut b, &mut c);
    (b, c)
}

/// Postgres `hash_bytes` (`hash_any`): 32-bit lookup3 of a byte string.
pub fn hash_bytes(k: &[u8]) -> u32 {
    hash_bytes_inner(k, 0).1
}

/// Postgres `hash_bytes_extended` (`hash_any_extended`): seeded, 64-bit.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let (b, c) = hash_bytes_inner(k, seed);
    ((b as u64) << 32) | c as u64
}

fn hash_u32_inner(k: u32, seed: u64) -> (u32, u32) {
    let init = INIT.wrapping_add(4).wrapping_add(LEN_SALT);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k);
    finalize(&mut a, &mut b, &mut c);
    (b, c)
}

/// Postgres `hash_bytes_uint32` (`hash_uint32`).
pub fn hash_uint32(k: u32) -> u32 {
    hash_u32_inner(k, 0).1
}

/// Postgres `hash_bytes_uint32_extended`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (b, c) = hash_u32_inner(k, seed);
    ((b as u64) << 32) | c as u64
}

/// int8 hashes fold to 32 bits so that equal values of int2/int4/int8 hash alike.
fn int8_fold(v: i64) -> u32 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    lo ^ if v >= 0 { hi } else { !hi }
}

pub fn hashint2(v: i16) -> i32 {
    hash_uint32(v as i32 as u32) as i32
}
pub fn hashint4(v: i32) -> i32 {
    hash_uint32(v as u32) as i32
}
pub fn hashint8(v: i64) -> i32 {
    hash_uint32(int8_fold(v)) as i32
}
/// `hashtext` under a deterministic collation (and `hashvarchar`, `hashbpchar` of a
/// value without trailing spaces): lookup3 of the UTF-8 bytes.
pub fn hashtext(v: &str) -> i32 {
    hash_bytes(v.as_bytes()) as i32
}
pub fn uuid_hash(v: &[u8; 16]) -> i32 {
    hash_bytes(v) as i32
}
/// `hashbool`/`hashchar` hash the value as a 32-bit integer.
pub fn hashbool(v: bool) -> i32 {
    hash_uint32(v as u32) as i32
}

pub fn hashint2extended(v: i16, seed: u64) -> u64 {
    hash_uint32_extended(v as i32 as u32, seed)
}
pub fn hashint4extended(v: i32, seed: u64) -> u64 {
    hash_uint32_extended(v as u32, seed)
}
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    hash_uint32_extended(int8_fold(v), seed)
}
pub fn hashtextextended(v: &str, seed: u64) -> u64 {
    hash_bytes_extended(v.as_bytes(), seed)
}
pub fn uuid_hash_extended(v: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(v, seed)
}
pub fn hashboolextended(v: bool, seed: u64) -> u64 {
    hash_uint32_extended(v as u32, seed)
}

/// Seed of `PARTITION BY HASH` (`HASH_PARTITION_SEED` in partbounds.h).
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// `hash_combine64` of common/hashfn.h.
pub fn hash_combine64(mut a: u64, b: u64) -> u64 {
    a ^= b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7);
    a
}

/// The partition (remainder) a single-column hash key lands in, given its
/// `*extended(value, HASH_PARTITION_SEED)` hash: what `satisfies_hash_partition` checks.
pub fn partition_for(extended_hash: u64, modulus: u64) -> u64 {
    hash_combine64(0, extended_hash) % modulus
}

/// Citus's shard ranges: the int32 hash space split into `shard_count` equal ranges
/// (the last one absorbs the remainder). Returns the 0-based shard index of `hash`.
pub fn citus_shard_index(hash: i32, shard_count: u32) -> u32 {
    let increment = (1u64 << 32) / shard_count as u64;
    let offset = (hash as i64 - i32::MIN as i64) as u64;
    ((offset / increment) as u32).min(shard_count - 1)
}

/// Citus's `shardminvalue` and `shardmaxvalue` of shard `index`.
pub fn citus_shard_range(index: u32, shard_count: u32) -> (i32, i32) {
    let increment = (1u64 << 32) / shard_count as u64;
    let min = i32::MIN as i64 + (index as u64 * increment) as i64;
    let max = if index == shard_count - 1 {
        i32::MAX as i64
    } else {
        min + increment as i64 - 1
    };
    (min as i32, max as i32)
}
