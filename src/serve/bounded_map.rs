//! A map that starts over when full: for caches of values that are cheap to make again
//! (footers, deletion vectors, the shape of a statement), where remembering which entry
//! was used last would cost more than the rare rebuild.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub struct BoundedMap<K, V> {
    map: HashMap<K, V>,
    most: usize,
}

impl<K: Hash + Eq, V: Clone> BoundedMap<K, V> {
    /// Keeps at most `most` entries; the one past that empties the map first.
    pub fn new(most: usize) -> BoundedMap<K, V> {
        BoundedMap {
            map: HashMap::new(),
            most: most.max(1),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).cloned()
    }

    pub fn insert(&mut self, key: K, value: V) {
        if self.map.len() >= self.most && !self.map.contains_key(&key) {
            self.map.clear();
        }
        self.map.insert(key, value);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_starts_over() {
        let mut m = BoundedMap::new(2);
        m.insert("a".to_string(), 1);
        m.insert("b".to_string(), 2);
        m.insert("b".to_string(), 3); // a key it holds: replaced, nothing dropped
        assert_eq!((m.get("a"), m.get("b"), m.len()), (Some(1), Some(3), 2));
        m.insert("c".to_string(), 4);
        assert_eq!((m.get("a"), m.get("c"), m.len()), (None, Some(4), 1));
    }
}
