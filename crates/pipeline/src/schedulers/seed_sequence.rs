//! numpy's `np.random.SeedSequence` (numpy 2.x `bit_generator.pyx`), the part torchsde uses:
//! `SeedSequence(entropy, spawn_key=..., pool_size=...).generate_state(n)` as uint32 words.
//!
//! It is Melissa O'Neill's `seed_seq` alternative: the entropy words are hashed into a pool,
//! the pool words mixed with each other, and `generate_state` hashes the pool out again. All
//! arithmetic is wrapping uint32. Verified against numpy by `tools/make_sde_fixtures.py`.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's default pool size, and the smallest it accepts.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// A seeded `SeedSequence`: its mixed entropy pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSequence {
    pool: Vec<u32>,
}

/// `_int_to_uint32_array`: a non-negative integer as 32-bit words, lowest first (`[0]` for 0).
fn int_words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while n > 0 {
        words.push(n as u32);
        n >>= 32;
    }
    words
}

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

impl SeedSequence {
    /// `SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size)`; `pool_size` below
    /// numpy's minimum of 4 is raised to it (numpy refuses it).
    pub fn new(entropy: u128, spawn_key: &[u128], pool_size: usize) -> Self {
        let pool_size = pool_size.max(DEFAULT_POOL_SIZE);
        // get_assembled_entropy: with a spawn key, the run entropy is zero-padded to the pool
        // size so that it cannot collide with the key's words.
        let mut entropy_words = int_words(entropy);
        let spawn_words: Vec<u32> = spawn_key.iter().flat_map(|&k| int_words(k)).collect();
        if !spawn_words.is_empty() && entropy_words.len() < pool_size {
            entropy_words.resize(pool_size, 0);
        }
        entropy_words.extend(spawn_words);

        // mix_entropy
        let mut pool = vec![0u32; pool_size];
        let mut hash_const = INIT_A;
        for (i, slot) in pool.iter_mut().enumerate() {
            let word = entropy_words.get(i).copied().unwrap_or(0);
            *slot = hashmix(word, &mut hash_const);
        }
        for src in 0..pool_size {
            for dst in 0..pool_size {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &word in entropy_words.iter().skip(pool_size) {
            for slot in pool.iter_mut() {
                *slot = mix(*slot, hashmix(word, &mut hash_const));
            }
        }
        Self { pool }
    }

    /// `generate_state(n_words)` (dtype uint32): the pool cycled through a second hash.
    pub fn generate_state(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        (0..n_words)
            .map(|i| {
                let mut v = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_split_into_low_words_first() {
        assert_eq!(int_words(0), vec![0]);
        assert_eq!(int_words(5), vec![5]);
        assert_eq!(int_words((7u128 << 32) | 9), vec![9, 7]);
        assert_eq!(int_words(1u128 << 64), vec![0, 0, 1]);
    }

    #[test]
    fn spawn_keys_change_the_state_and_pad_the_entropy() {
        let plain = SeedSequence::new(42, &[], 24).generate_state(4);
        let keyed = SeedSequence::new(42, &[0, 0], 24).generate_state(4);
        assert_ne!(plain, keyed);
        // Padding: entropy 42 with key [1] is not entropy [42, 1] without a key.
        assert_ne!(
            SeedSequence::new(42, &[1], 4),
            SeedSequence::new(42 | (1u128 << 32), &[], 4)
        );
    }
}
