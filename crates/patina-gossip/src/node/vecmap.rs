//! A map kept as one sorted vector: for per-member tables every node holds (one entry per
//! member, so N^2 entries across a cluster, or a simulation of one). A B-tree node spends
//! about half its room empty when keys arrive in order (a joined membership's notifications
//! do), and every entry of a `BTreeMap` costs a pointer's share of its node; here an entry
//! costs its own size, and room left over after growth is given back. Lookups are binary
//! searches; an insert moves the entries after it: members join rarely, but a node that joins
//! a cluster of N learns N members in random key order, N²/4 entries moved (about 0.8 GB of
//! memory copied, a fraction of a second, at 10,000 members); the simulation's node ids are
//! sequential, so there they arrive in order and are appended.

/// Spare room (as a fraction of the entries: 1/SLACK) kept after an insert or removal
/// before the vector is shrunk to fit.
const SLACK: usize = 8;

#[derive(Debug, Clone)]
pub struct VecMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.find(key) {
            Ok(i) => Some(&mut self.entries[i].1),
            Err(_) => None,
        }
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    /// Set `key`'s value; the old one, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// `key`'s value, a default one inserted first if there is none.
    pub fn or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (key, V::default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
        self.fit();
    }

    /// Give back room beyond 1/SLACK of the entries (growth doubles the vector: at 10,000
    /// entries it would hold room for 16,384). Called once per batch of changes, not per
    /// insert: shrinking copies the whole vector.
    pub fn fit(&mut self) {
        let len = self.entries.len();
        if self.entries.capacity() > len + len / SLACK + 4 {
            self.entries.shrink_to(len + len / SLACK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::VecMap;
    use std::collections::BTreeMap;

    #[test]
    fn a_vec_map_behaves_as_a_btree_map() {
        // A fixed pseudo-random sequence of operations on both.
        let mut v: VecMap<u32, u32> = VecMap::default();
        let mut b: BTreeMap<u32, u32> = BTreeMap::new();
        let mut x = 12345u64;
        for step in 0..5000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = ((x >> 33) % 300) as u32;
            match (x >> 20) % 4 {
                0 => assert_eq!(v.insert(key, step), b.insert(key, step)),
                1 => {
                    *v.or_default(key) += 1;
                    *b.entry(key).or_default() += 1;
                }
                2 => assert_eq!(v.get(&key), b.get(&key)),
                _ => {
                    v.retain(|k, _| *k != key);
                    b.remove(&key);
                }
            }
            assert_eq!(v.contains_key(&key), b.contains_key(&key));
        }
        let left: Vec<(u32, u32)> = v.iter().map(|(k, v)| (*k, *v)).collect();
        let right: Vec<(u32, u32)> = b.into_iter().collect();
        assert_eq!(left, right);
    }

    #[test]
    fn room_beyond_an_eighth_is_given_back() {
        let mut v: VecMap<u64, u64> = VecMap::default();
        for k in 0..10_000 {
            v.insert(k, k);
        }
        assert!(v.entries.capacity() > 10_000 + 10_000 / 8 + 4);
        v.fit();
        assert!(v.entries.capacity() <= 10_000 + 10_000 / 8 + 4);
        assert_eq!(v.len(), 10_000);
        assert_eq!(v.get(&9_999), Some(&9_999));
    }
}
