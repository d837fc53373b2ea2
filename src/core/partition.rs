//! Keys to hashes to partitions: the one place that says where a key lives.
//!
//! Dynamo's "strategy 3" splits the 64-bit hash ring into Q equal partitions.
//! A key's position is `xxh3_64(key)`; its partition is the top `log2(Q)`
//! bits of that position, so partition `p` covers the ring range
//! `[p << (64 - bits), (p + 1) << (64 - bits))`.
//!
//! Invariant: the node, the client and the storage engine all call
//! [`key_hash`] and [`partition_of`]; nobody hashes keys another way.

use xxhash_rust::xxh3::xxh3_64;

/// Default number of partitions: large enough that nodes can be added for a
/// long time with every node keeping many partitions (Q >> nodes).
pub const DEFAULT_PARTITIONS: u32 = 1024;

/// Largest supported partition count (keeps per-shard partition tables small).
pub const MAX_PARTITIONS: u32 = 1 << 16;

/// The key's position on the ring.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Partition of a ring position, for `partitions` a power of two.
#[inline]
pub fn partition_of(hash: u64, partitions: u32) -> u32 {
    debug_assert!(partitions.is_power_of_two() && partitions <= MAX_PARTITIONS);
    if partitions == 1 {
        return 0;
    }
    (hash >> (64 - partitions.trailing_zeros())) as u32
}

/// The shard of a node that owns `key`: the shards split the partitions
/// into contiguous ranges, partition `p` belonging to shard
/// `p * shards / partitions`. The node routes by this and shard-aware
/// clients connect by it, so it is written once, here.
///
/// Ranges rather than `p mod shards`: the ring deals a node's partitions
/// out at regular strides (with 3 nodes, every node can own only even or
/// only odd partitions), and a modulus can line up with a stride and
/// leave a shard with none of them; a contiguous range holds its share of
/// any stride.
#[inline]
pub fn shard_of(key: &[u8], partitions: u32, shards: usize) -> usize {
    shard_of_hash(key_hash(key), partitions, shards)
}

/// [`shard_of`] for a key whose hash is known.
#[inline]
pub fn shard_of_hash(hash: u64, partitions: u32, shards: usize) -> usize {
    shard_of_partition(partition_of(hash, partitions), partitions, shards)
}

/// The shard of a node that owns partition `p` (see [`shard_of`]).
#[inline]
pub fn shard_of_partition(p: u32, partitions: u32, shards: usize) -> usize {
    debug_assert!(shards > 0 && p < partitions);
    (p as u64 * shards as u64 / partitions as u64) as usize
}

/// Checks a configured partition count.
pub fn validate_partitions(partitions: u32) -> Result<(), String> {
    if !partitions.is_power_of_two() || partitions > MAX_PARTITIONS {
        return Err(format!("partition count must be a power of two between 1 and {MAX_PARTITIONS}, got {partitions}"));
    }
    Ok(())
}

const _: () = assert!(DEFAULT_PARTITIONS.is_power_of_two() && DEFAULT_PARTITIONS <= MAX_PARTITIONS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_split_the_ring_evenly_by_top_bits() {
        assert_eq!(partition_of(0, 1024), 0);
        assert_eq!(partition_of(u64::MAX, 1024), 1023);
        assert_eq!(partition_of(1 << 54, 1024), 1);
        assert_eq!(partition_of((1 << 54) - 1, 1024), 0);
        assert_eq!(partition_of(u64::MAX, 1), 0);
    }

    #[test]
    fn key_hash_is_xxh3_golden() {
        // Pinned so that a dependency change cannot silently move every key.
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(key_hash(b"gyre"), 0x03f5_281d_bb5e_7fdc);
    }

    #[test]
    fn shards_own_contiguous_equal_ranges() {
        assert_eq!(shard_of_partition(0, 1024, 3), 0);
        assert_eq!(shard_of_partition(341, 1024, 3), 0);
        assert_eq!(shard_of_partition(342, 1024, 3), 1);
        assert_eq!(shard_of_partition(1023, 1024, 3), 2);
        let mut counts = [0usize; 3];
        for p in 0..1024 {
            counts[shard_of_partition(p, 1024, 3)] += 1;
        }
        assert_eq!(counts, [342, 341, 341]);
        // Every stride of partitions is shared out, unlike with `p mod S`.
        for stride in 2..7u32 {
            let mut c = [0usize; 2];
            for p in (0..1024).step_by(stride as usize) {
                c[shard_of_partition(p, 1024, 2)] += 1;
            }
            assert!(c[0].abs_diff(c[1]) <= 1, "stride {stride}: {c:?}");
        }
        assert_eq!(shard_of_partition(0, 1, 4), 0);
    }

    #[test]
    fn rejects_bad_partition_counts() {
        assert!(validate_partitions(1000).is_err());
        assert!(validate_partitions(1 << 17).is_err());
        assert!(validate_partitions(256).is_ok());
    }
}
