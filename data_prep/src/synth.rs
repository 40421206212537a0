//! A deterministic synthetic story corpus from a small grammar written for this project.
//!
//! Characters, places, objects and feelings are combined by a few sentence templates into
//! stories of 3 to 8 sentences with some dialogue (straight and curly quotes, so multi-byte
//! UTF-8 is exercised), written in the TinyStories format: each story followed by a line
//! `<|endoftext|>`. The same seed always gives byte-identical output (ChaCha8).

use std::io::Write;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::tokenizer::EOT_TOKEN;

/// Default number of stories for `data_prep synth`.
pub const DEFAULT_SYNTH_STORIES: usize = 2000;

/// (name, kind, subject pronoun, possessive pronoun)
const CHARACTERS: &[(&str, &str, &str, &str)] = &[
    ("Lily", "girl", "she", "her"),
    ("Tom", "boy", "he", "his"),
    ("Max", "dog", "he", "his"),
    ("Mia", "cat", "she", "her"),
    ("Ben", "bunny", "he", "his"),
    ("Sue", "bird", "she", "her"),
    ("Sam", "frog", "he", "his"),
    ("Kim", "duck", "she", "her"),
    ("Leo", "lion", "he", "his"),
    ("Zoe", "fox", "she", "her"),
    ("Bob", "bear", "he", "his"),
    ("Ann", "mouse", "she", "her"),
    ("Tim", "turtle", "he", "his"),
    ("Rosa", "squirrel", "she", "her"),
];

const ADJECTIVES: &[&str] = &[
    "little", "brave", "kind", "shy", "happy", "curious", "silly", "tiny", "clever", "gentle",
];

const PLACES: &[&str] = &[
    "the park",
    "the forest",
    "the garden",
    "the beach",
    "the big hill",
    "the old barn",
    "the river",
    "the school",
    "the market",
    "the pond",
    "the little café",
];

/// (with article, bare noun)
const OBJECTS: &[(&str, &str)] = &[
    ("a red ball", "ball"),
    ("a shiny stone", "stone"),
    ("a blue kite", "kite"),
    ("a big box", "box"),
    ("a soft blanket", "blanket"),
    ("a toy car", "car"),
    ("a yellow hat", "hat"),
    ("a little boat", "boat"),
    ("a funny book", "book"),
    ("a sweet apple", "apple"),
    ("a golden key", "key"),
];

const FEELINGS: &[&str] = &[
    "happy",
    "sad",
    "scared",
    "excited",
    "proud",
    "surprised",
    "sleepy",
    "upset",
    "calm",
];

const TIMES: &[&str] = &[
    "One sunny morning",
    "One rainy day",
    "Later that day",
    "After a while",
    "The next day",
    "That evening",
];

const GREETINGS: &[&str] = &["Hello", "Hi", "Good morning", "Look", "Wow"];

struct Cast<'a> {
    hero: (&'a str, &'a str, &'a str, &'a str),
    friend: (&'a str, &'a str, &'a str, &'a str),
    object: (&'a str, &'a str),
    place: &'a str,
    curly: bool,
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    items.choose(rng).expect("non-empty word list")
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl Cast<'_> {
    fn quote(&self, text: &str) -> String {
        if self.curly {
            format!("“{text}”")
        } else {
            format!("\"{text}\"")
        }
    }
}

fn opening(rng: &mut ChaCha8Rng, c: &Cast) -> String {
    let (name, kind, _, _) = c.hero;
    let adj = pick(rng, ADJECTIVES);
    match rng.gen_range(0..3) {
        0 => format!("Once upon a time, there was a {adj} {kind} named {name}."),
        1 => format!("There once was a {adj} {kind} called {name}."),
        _ => format!("{name} was a {adj} {kind} who lived near {}.", c.place),
    }
}

fn middle(rng: &mut ChaCha8Rng, c: &Cast) -> String {
    let (name, _, he, his) = c.hero;
    let (friend, fkind, _, _) = c.friend;
    let (obj, noun) = c.object;
    let feeling = pick(rng, FEELINGS);
    match rng.gen_range(0..10) {
        0 => format!("{}, {name} went to {}.", pick(rng, TIMES), c.place),
        1 => format!("{} found {obj} under a tree.", capitalize(he)),
        2 => format!("{name} felt {feeling} because {he} could not find {his} {noun}."),
        3 => format!("At {}, {name} met a {fkind} named {friend}.", c.place),
        4 => format!(
            "{} said {name}.",
            c.quote(&format!("{}, {friend}!", pick(rng, GREETINGS)))
        ),
        5 => format!(
            "{friend} asked, {}",
            c.quote(&format!("Can we play with the {noun} together?"))
        ),
        6 => format!(
            "{} said {name} with a smile.",
            c.quote(&format!("Yes, let's go to {}!", c.place))
        ),
        7 => format!(
            "{} said {friend}.",
            c.quote(&format!("I am {feeling} today,"))
        ),
        8 => "They played all day and laughed a lot.".to_owned(),
        _ => format!("{} shared the {noun} with {friend}.", capitalize(he)),
    }
}

fn closing(rng: &mut ChaCha8Rng, c: &Cast) -> String {
    let (name, _, he, _) = c.hero;
    let (friend, _, _, _) = c.friend;
    match rng.gen_range(0..4) {
        0 => format!("In the end, {name} and {friend} were best friends."),
        1 => format!(
            "From that day on, {name} was never {} again.",
            pick(rng, &["sad", "scared", "upset", "lonely"])
        ),
        2 => format!(
            "{name} went home and slept well, feeling {} — what a day!",
            pick(rng, FEELINGS)
        ),
        _ => format!("{} knew it was the best day ever.", capitalize(he)),
    }
}

/// One synthetic story (3–8 sentences, no separator).
pub fn synth_story(rng: &mut ChaCha8Rng) -> String {
    let hero = *pick(rng, CHARACTERS);
    let mut friend = *pick(rng, CHARACTERS);
    while friend.0 == hero.0 {
        friend = *pick(rng, CHARACTERS);
    }
    let cast = Cast {
        hero,
        friend,
        object: *pick(rng, OBJECTS),
        place: pick::<&str>(rng, PLACES),
        curly: rng.gen_bool(0.3),
    };
    let sentences = rng.gen_range(3..=8);
    let mut out = opening(rng, &cast);
    for i in 1..sentences {
        let s = if i + 1 == sentences {
            closing(rng, &cast)
        } else {
            middle(rng, &cast)
        };
        out.push(if rng.gen_bool(0.2) { '\n' } else { ' ' });
        out.push_str(&s);
    }
    out
}

/// Writes `stories` synthetic stories, each followed by a line `<|endoftext|>`.
pub fn synth_to_writer<W: Write>(w: &mut W, stories: usize, seed: u64) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..stories {
        let story = synth_story(&mut rng);
        w.write_all(story.as_bytes())?;
        w.write_all(b"\n")?;
        w.write_all(EOT_TOKEN.as_bytes())?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Writes a synthetic corpus file (crash-safely: temporary name, fsync, rename).
///
/// The same `stories` and `seed` always produce a byte-identical file.
pub fn synth(out: &Path, stories: usize, seed: u64) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .ctx(|| format!("cannot create folder {}", parent.display()))?;
    }
    let mut file = AtomicFile::create(out)?;
    synth_to_writer(&mut file, stories, seed).ctx(|| format!("cannot write {}", out.display()))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        synth_to_writer(&mut a, 50, 3).unwrap();
        synth_to_writer(&mut b, 50, 3).unwrap();
        synth_to_writer(&mut c, 50, 4).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn file_matches_writer_and_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.txt");
        synth(&p, 120, 9).unwrap();
        let mut w = Vec::new();
        synth_to_writer(&mut w, 120, 9).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), w);
        let stories = crate::corpus::read_stories(&p, EOT_TOKEN).unwrap();
        assert_eq!(stories.len(), 120);
        for s in &stories {
            let sentences = s.matches(['.', '!', '?']).count();
            assert!(sentences >= 3, "{s}");
        }
        let text = String::from_utf8(w).unwrap();
        assert!(text.contains('“') || text.contains('"'));
    }
}
