//! Topic matching: routing keys and binding patterns are words separated by
//! `.`; in a pattern `*` matches exactly one word and `#` zero or more.
//!
//! [`TopicIndex`] is a trie over pattern words, so matching one routing key
//! against thousands of bindings visits only the branches that can match.

use std::collections::HashMap;

#[derive(Debug)]
pub struct TopicIndex<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { words: HashMap::new(), star: None, hash: None, values: Vec::new() }
    }
}

impl<T> Default for TopicIndex<T> {
    fn default() -> Self {
        TopicIndex { root: Node::default(), len: 0 }
    }
}

impl<T> TopicIndex<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
        for word in pattern.split('.') {
            node = match word {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Calls `f` for the value of every pattern matching `routing_key`. A
    /// value can be reported more than once (when several paths match); the
    /// caller deduplicates.
    pub fn for_each_match<'a>(&'a self, routing_key: &str, f: &mut impl FnMut(&'a T)) {
        let words: Vec<&str> = routing_key.split('.').collect();
        walk(&self.root, &words, f);
    }
}

fn walk<'a, T>(node: &'a Node<T>, words: &[&str], f: &mut impl FnMut(&'a T)) {
    if let Some(hash) = &node.hash {
        // `#` swallows zero or more words.
        for skip in 0..=words.len() {
            walk(hash, &words[skip..], f);
        }
    }
    match words.split_first() {
        None => node.values.iter().for_each(&mut *f),
        Some((first, rest)) => {
            if let Some(child) = node.words.get(*first) {
                walk(child, rest, f);
            }
            if let Some(star) = &node.star {
                walk(star, rest, f);
            }
        }
    }
}

/// The specification, written as directly as possible; the trie is tested
/// against it.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = routing_key.split('.').collect();
    go(&p, &k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn index_matches(patterns: &[String], key: &str) -> BTreeSet<usize> {
        let mut idx = TopicIndex::new();
        for (i, p) in patterns.iter().enumerate() {
            idx.insert(p, i);
        }
        let mut out = BTreeSet::new();
        idx.for_each_match(key, &mut |i| {
            out.insert(*i);
        });
        out
    }

    #[test]
    fn should_match_the_documented_examples() {
        let cases = [
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "quick.orange.rabbit", true),
            ("lazy.#", "lazy.orange.elephant", true),
            ("*.orange.*", "quick.orange.fox", true),
            ("lazy.#", "lazy.brown.fox", true),
            ("lazy.#", "lazy", true),
            ("*.*.rabbit", "quick.brown.fox", false),
            ("*.orange.*", "orange", false),
            ("*.orange.*", "quick.orange.male.rabbit", false),
            ("lazy.#", "lazy.orange.male.rabbit", true),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("*", "", true),
            ("*", "a.b", false),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y.c", false),
            ("#.#", "a", true),
            ("", "", true),
            ("a", "", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(matches(pattern, key), expected, "{pattern} vs {key}");
            assert_eq!(!index_matches(&[pattern.to_string()], key).is_empty(), expected, "trie: {pattern} vs {key}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("c".to_string()), Just(String::new())]
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![word(), Just("*".to_string()), Just("#".to_string())]
    }

    proptest! {
        #[test]
        fn trie_agrees_with_the_reference_matcher(
            patterns in prop::collection::vec(prop::collection::vec(pattern_word(), 1..5).prop_map(|w| w.join(".")), 1..12),
            key in prop::collection::vec(word(), 1..6).prop_map(|w| w.join(".")),
        ) {
            let expected: BTreeSet<usize> = patterns.iter().enumerate().filter(|(_, p)| matches(p, &key)).map(|(i, _)| i).collect();
            prop_assert_eq!(index_matches(&patterns, &key), expected);
        }
    }
}
