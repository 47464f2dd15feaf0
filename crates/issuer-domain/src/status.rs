//! Credential status after issuance: revocation and suspension published through the IETF
//! Token Status List (draft-ietf-oauth-status-list).
//!
//! Every credential copy gets its own entry in a status list: a `(list, idx)` that the
//! credential names in its `status.status_list` claim and that verifiers look up. Lists are
//! shared by every tenant of the issuer, hold a fixed number of entries (herd privacy: a list
//! says nothing about who issued what, and a fetch of it nothing about which credential is
//! checked), and hand out their indices in a keyed pseudo-random order, so that an index tells
//! neither the issuance order nor its neighbours' issuer. An index is never handed out twice.
//!
//! The order comes from [`IndexPermutation`]: the list's n-th allocation gets
//! `permutation(n)`. Allocation is then one counter increment in the store, and distinctness
//! follows from the permutation being a bijection, with no search for free slots however full
//! the list is.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Where an issued credential stands. Its value in a status list (2 bits per entry) is the one
/// the draft registers: 0 valid, 1 invalid (revoked), 2 suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialStatus {
    Valid,
    Suspended,
    /// Final: a revoked credential is never valid again.
    Revoked,
}

impl CredentialStatus {
    pub const ALL: [CredentialStatus; 3] = [
        CredentialStatus::Valid,
        CredentialStatus::Suspended,
        CredentialStatus::Revoked,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            CredentialStatus::Valid => "valid",
            CredentialStatus::Suspended => "suspended",
            CredentialStatus::Revoked => "revoked",
        }
    }

    /// The status value in a list (`0x00` VALID, `0x01` INVALID, `0x02` SUSPENDED).
    pub const fn list_value(self) -> u8 {
        match self {
            CredentialStatus::Valid => 0,
            CredentialStatus::Revoked => 1,
            CredentialStatus::Suspended => 2,
        }
    }
}

impl FromStr for CredentialStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CredentialStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("must be one of valid, suspended, revoked; got `{s}`"))
    }
}

impl fmt::Display for CredentialStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The credentials an accepted issuance gave its wallet: every copy shares this status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuedCredentials {
    pub status: CredentialStatus,
    /// How many copies (one per key of the credential request's batch).
    pub count: i64,
    /// When the copies expire; until then their status must stay published.
    pub expires_at: DateTime<Utc>,
}

/// One entry of a status list: what a credential's `status.status_list` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusRef {
    pub list_id: Uuid,
    pub idx: i64,
}

/// Entries a store reserved from one list: the list's allocations `first .. first + count`,
/// each mapped to its index by the list's permutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusBlock {
    pub list_id: Uuid,
    /// Entries in the list.
    pub size: i64,
    /// The list's permutation key (see [`IndexPermutation`]).
    pub seed: [u8; 16],
    pub first: i64,
    pub count: i64,
}

impl StatusBlock {
    /// The entries of the block, in allocation order.
    pub fn refs(&self) -> Vec<StatusRef> {
        let permutation = IndexPermutation::new(self.seed, self.size as u64);
        (self.first..self.first + self.count)
            .map(|n| StatusRef {
                list_id: self.list_id,
                idx: permutation.index(n as u64) as i64,
            })
            .collect()
    }
}

/// A keyed permutation of `0 .. size`: a balanced Feistel network over the smallest even number
/// of bits that covers `size`, with cycle walking for values past it. Without the key the
/// sequence `index(0), index(1), ...` cannot be told from a random one, and being a bijection it
/// never repeats.
#[derive(Debug, Clone)]
pub struct IndexPermutation {
    key: [u8; 16],
    size: u64,
    half_bits: u32,
}

/// Feistel rounds; four make a pseudo-random permutation of a PRF, two more are margin.
const ROUNDS: u8 = 6;

impl IndexPermutation {
    /// A permutation of `0 .. size` (`size` ≥ 2).
    pub fn new(key: [u8; 16], size: u64) -> Self {
        let bits = (u64::BITS - (size.max(2) - 1).leading_zeros()).max(2);
        Self {
            key,
            size,
            half_bits: bits.div_ceil(2),
        }
    }

    /// The index of the `n`-th allocation (`n < size`).
    pub fn index(&self, n: u64) -> u64 {
        debug_assert!(n < self.size);
        let mut x = self.encrypt(n);
        // Each step stays inside the permutation's cycle through `n`, which holds values below
        // `size` (`n` itself), so this ends; with the domain at most 4 × size, after 4 steps on
        // average.
        while x >= self.size {
            x = self.encrypt(x);
        }
        x
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for round in 0..ROUNDS {
            let mut h = Sha256::new();
            h.update(self.key);
            h.update([round]);
            h.update(right.to_be_bytes());
            let digest = h.finalize();
            let f = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn statuses_have_the_drafts_values_and_words() {
        assert_eq!(CredentialStatus::Valid.list_value(), 0);
        assert_eq!(CredentialStatus::Revoked.list_value(), 1);
        assert_eq!(CredentialStatus::Suspended.list_value(), 2);
        for s in CredentialStatus::ALL {
            assert_eq!(s.as_str().parse::<CredentialStatus>(), Ok(s));
        }
        assert!("gone".parse::<CredentialStatus>().is_err());
    }

    #[test]
    fn the_permutation_hands_out_every_index_once() {
        for size in [2u64, 3, 16, 17, 1000, 4096, 131_072] {
            let p = IndexPermutation::new([7; 16], size);
            let seen: HashSet<u64> = (0..size).map(|n| p.index(n)).collect();
            assert_eq!(seen.len() as u64, size, "size {size}");
            assert!(seen.iter().all(|&i| i < size));
        }
    }

    #[test]
    fn the_order_depends_on_the_key_and_is_not_the_allocation_order() {
        let a = IndexPermutation::new([1; 16], 131_072);
        let b = IndexPermutation::new([2; 16], 131_072);
        let first_a: Vec<u64> = (0..64).map(|n| a.index(n)).collect();
        let first_b: Vec<u64> = (0..64).map(|n| b.index(n)).collect();
        assert_ne!(first_a, first_b);
        // Consecutive allocations land far apart: the mean gap of 64 is near size / 3.
        let gaps: u64 = first_a.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
        assert!(gaps / 63 > 131_072 / 8, "mean gap {}", gaps / 63);
        let ascending = first_a.windows(2).filter(|w| w[0] < w[1]).count();
        assert!((16..48).contains(&ascending), "{ascending} of 63 ascending");
    }

    #[test]
    fn a_block_maps_its_allocations_through_the_lists_permutation() {
        let block = StatusBlock {
            list_id: Uuid::nil(),
            size: 16,
            seed: [3; 16],
            first: 14,
            count: 2,
        };
        let p = IndexPermutation::new([3; 16], 16);
        let refs = block.refs();
        assert_eq!(
            refs.iter().map(|r| r.idx as u64).collect::<Vec<_>>(),
            [p.index(14), p.index(15)]
        );
    }
}
