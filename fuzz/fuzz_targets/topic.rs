//! Topic matching: the broker's trie walk against a dynamic-programming
//! oracle (quadratic, independent of the trie), on patterns and keys over a
//! small alphabet with `*`, `#`, runs of `#` and empty words.

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../broker/src/routing/topic.rs"]
mod topic;

/// `pattern[i..]` matches `key[j..]`, for every (i, j), bottom-up.
fn oracle(pattern: &[&str], key: &[&str]) -> bool {
    let (p, k) = (pattern.len(), key.len());
    let mut m = vec![vec![false; k + 1]; p + 1];
    m[p][k] = true;
    for i in (0..p).rev() {
        for j in (0..=k).rev() {
            m[i][j] = match pattern[i] {
                // Zero words, or one word and still `#`.
                "#" => m[i + 1][j] || (j < k && m[i][j + 1]),
                "*" => j < k && m[i + 1][j + 1],
                w => j < k && key[j] == w && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}

fuzz_target!(|data: &[u8]| {
    // 0xff separates patterns; the last segment is the routing key.
    let mut segments: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let Some(key) = segments.pop() else { return };
    if segments.is_empty() || segments.len() > 32 {
        return;
    }
    const PATTERN_WORDS: [&str; 5] = ["a", "b", "*", "#", ""];
    const KEY_WORDS: [&str; 3] = ["a", "b", ""];
    let patterns: Vec<String> =
        segments.iter().map(|s| s.iter().map(|b| PATTERN_WORDS[*b as usize % 5]).collect::<Vec<_>>().join(".")).collect();
    let key_words: Vec<&str> = key.iter().map(|b| KEY_WORDS[*b as usize % 3]).collect();
    let key = if key_words.is_empty() { String::new() } else { key_words.join(".") };
    let mut index = topic::TopicIndex::new();
    for (i, p) in patterns.iter().enumerate() {
        index.insert(p, i);
    }
    let mut got = BTreeSet::new();
    index.for_each_match(&key, &mut |i| {
        got.insert(*i);
    });
    let key_split: Vec<&str> = key.split('.').collect();
    let expected: BTreeSet<usize> =
        patterns.iter().enumerate().filter(|(_, p)| oracle(&p.split('.').collect::<Vec<_>>(), &key_split)).map(|(i, _)| i).collect();
    assert_eq!(got, expected, "patterns {patterns:?}, key {key:?}");
    // Collapsing runs of `#` keeps the meaning.
    for p in &patterns {
        let collapsed: Vec<&str> = topic::normalized_words(p).collect();
        assert_eq!(oracle(&collapsed, &key_split), oracle(&p.split('.').collect::<Vec<_>>(), &key_split), "{p}");
    }
});
