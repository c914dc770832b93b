//! The gossip keyring: the keys that seal and open datagrams (SWIM and pushes alike), which
//! one seals, and whether plaintext datagrams are still taken.
//!
//! Datagrams are sealed with ChaCha20-Poly1305 (ring): fast in software on every CPU and
//! constant-time without AES instructions. The envelope's header (magic, version, flags,
//! cluster name) is the associated data, so a sealed datagram cannot be moved to another
//! cluster or have its flags rewritten. Each datagram carries a fresh random 96-bit nonce
//! from the OS (no counter to lose across restarts: two agents sharing a key never reuse a
//! nonce but by a 2^-96 chance per pair of datagrams).
//!
//! A keyring changes by operations an operator applies to every agent (`patina keyring`,
//! through `Admin.Keyring`), as Consul's does: install a key everywhere, then use it
//! everywhere, then remove the old one. A key in use cannot be removed; every installed key
//! is tried on receipt. A rolling enable on a running plaintext cluster: install, use (every
//! agent seals and still takes plaintext from those not yet switched), then refuse
//! plaintext.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// Bytes of a gossip key.
pub const KEY_LEN: usize = 32;
/// Keys a keyring holds at most: each is tried on every datagram no other key opened.
pub const MAX_KEYS: usize = 8;
/// Bytes sealing adds to a datagram: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// One gossip key: 32 random bytes, written as standard base64 (as `consul keygen`'s).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GossipKey([u8; KEY_LEN]);

impl GossipKey {
    /// A new key from the OS's randomness.
    pub fn generate() -> GossipKey {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).expect("the OS random source failed");
        GossipKey(k)
    }

    pub fn parse(text: &str) -> Result<GossipKey, KeyringError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyringError::BadKey)?;
        let k: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyringError::BadKey)?;
        Ok(GossipKey(k))
    }

    pub fn encode(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// What logs, status and `patina keyring list` show of a key: the first 8 bytes of its
    /// SHA-256, in hex. Names a key without revealing it.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GossipKey({})", self.fingerprint())
    }
}

/// A change to a keyring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyringOp {
    /// Add a key (tried on receipt; already installed: nothing changes).
    Install(GossipKey),
    /// Seal with this installed key from now on.
    Use(GossipKey),
    /// Remove a key (not the one in use; not installed: nothing changes).
    Remove(GossipKey),
    /// Take plaintext datagrams (`true`) or drop them (`false`, needs a key in use).
    AcceptPlaintext(bool),
    /// Stop sealing (needs plaintext accepted): how encryption is turned off again.
    StopSealing,
}

/// Why a keyring operation (or a keyring file) was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("a gossip key is 32 bytes in standard base64 (patina keyring generate makes one)")]
    BadKey,
    #[error("the keyring holds {MAX_KEYS} keys already: remove one first")]
    Full,
    #[error("key {0} is not installed: install it everywhere first")]
    NotInstalled(String),
    #[error("key {0} is in use: use another key first")]
    InUse(String),
    #[error("plaintext cannot be refused while no key is in use: use a key first")]
    NoKeyInUse,
    #[error("sealing cannot stop while plaintext is refused: accept plaintext first")]
    PlaintextRefused,
    #[error("keyring file line {0}: {1}")]
    BadFile(usize, String),
}

/// The keys, the one in use, and whether plaintext is taken. The default (no keys,
/// plaintext taken) is a cluster without gossip encryption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<GossipKey>,
    primary: Option<GossipKey>,
    accept_plaintext: bool,
}

impl Default for Keyring {
    fn default() -> Keyring {
        Keyring {
            keys: Vec::new(),
            primary: None,
            accept_plaintext: true,
        }
    }
}

impl Keyring {
    /// A keyring of one key, in use, refusing plaintext: a new agent of an encrypted cluster.
    pub fn with_key(key: GossipKey) -> Keyring {
        Keyring {
            keys: vec![key.clone()],
            primary: Some(key),
            accept_plaintext: false,
        }
    }

    pub fn keys(&self) -> &[GossipKey] {
        &self.keys
    }

    /// The key datagrams are sealed with (`None`: sent in plaintext).
    pub fn primary(&self) -> Option<&GossipKey> {
        self.primary.as_ref()
    }

    pub fn accepts_plaintext(&self) -> bool {
        self.accept_plaintext
    }

    /// Apply `op`, or say why not (then nothing changed).
    pub fn apply(&mut self, op: &KeyringOp) -> Result<(), KeyringError> {
        match op {
            KeyringOp::Install(k) => {
                if !self.keys.contains(k) {
                    if self.keys.len() >= MAX_KEYS {
                        return Err(KeyringError::Full);
                    }
                    self.keys.push(k.clone());
                }
            }
            KeyringOp::Use(k) => {
                if !self.keys.contains(k) {
                    return Err(KeyringError::NotInstalled(k.fingerprint()));
                }
                self.primary = Some(k.clone());
            }
            KeyringOp::Remove(k) => {
                if self.primary.as_ref() == Some(k) {
                    return Err(KeyringError::InUse(k.fingerprint()));
                }
                self.keys.retain(|x| x != k);
            }
            KeyringOp::AcceptPlaintext(accept) => {
                if !accept && self.primary.is_none() {
                    return Err(KeyringError::NoKeyInUse);
                }
                self.accept_plaintext = *accept;
            }
            KeyringOp::StopSealing => {
                if !self.accept_plaintext {
                    return Err(KeyringError::PlaintextRefused);
                }
                self.primary = None;
            }
        }
        Ok(())
    }

    /// The keyring file's text: one line per fact, keys in base64. The file is the agent's
    /// own (mode 0600, in its data directory): it outlives restarts and wins over the
    /// configured key, as Consul's keyring file does.
    pub fn to_text(&self) -> String {
        let mut out = String::from("# patina gossip keyring: written by the agent\n");
        out.push_str(if self.accept_plaintext {
            "plaintext accept\n"
        } else {
            "plaintext refuse\n"
        });
        for k in &self.keys {
            let verb = if Some(k) == self.primary.as_ref() {
                "use"
            } else {
                "key"
            };
            out.push_str(&format!("{verb} {}\n", k.encode()));
        }
        out
    }

    pub fn from_text(text: &str) -> Result<Keyring, KeyringError> {
        let mut ring = Keyring::default();
        let mut plaintext = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| KeyringError::BadFile(n, why.to_owned());
            let (verb, arg) = line.split_once(' ').ok_or_else(|| bad("no value"))?;
            match verb {
                "plaintext" => {
                    plaintext = Some(match arg.trim() {
                        "accept" => true,
                        "refuse" => false,
                        _ => return Err(bad("plaintext is accept or refuse")),
                    })
                }
                "key" | "use" => {
                    let k = GossipKey::parse(arg).map_err(|e| bad(&e.to_string()))?;
                    ring.apply(&KeyringOp::Install(k.clone()))
                        .map_err(|e| bad(&e.to_string()))?;
                    if verb == "use" {
                        if ring.primary.is_some() {
                            return Err(bad("two keys in use"));
                        }
                        ring.primary = Some(k);
                    }
                }
                _ => return Err(bad("unknown line")),
            }
        }
        let accept = plaintext.ok_or(KeyringError::BadFile(0, "no plaintext line".into()))?;
        ring.apply(&KeyringOp::AcceptPlaintext(accept))
            .map_err(|e| KeyringError::BadFile(0, e.to_string()))?;
        Ok(ring)
    }
}

/// A keyring ready to seal and open: each key expanded once.
pub(crate) struct Sealer {
    ring: Keyring,
    keys: Vec<LessSafeKey>,
    primary: Option<usize>,
}

/// Why a sealed datagram was not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// No installed key opened it (another key, forged, or damaged).
    NoKey,
    /// Too short to hold a nonce and a tag.
    Short,
}

impl Sealer {
    pub(crate) fn new(ring: Keyring) -> Sealer {
        let keys: Vec<LessSafeKey> = ring
            .keys
            .iter()
            .map(|k| {
                LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k.0).expect("a 32-byte key"))
            })
            .collect();
        let primary = ring
            .primary
            .as_ref()
            .and_then(|p| ring.keys.iter().position(|k| k == p));
        Sealer {
            ring,
            keys,
            primary,
        }
    }

    pub(crate) fn keyring(&self) -> &Keyring {
        &self.ring
    }

    pub(crate) fn seals(&self) -> bool {
        self.primary.is_some()
    }

    /// Append nonce, `payload` sealed under `header` (the associated data) and the tag to
    /// `out`.
    pub(crate) fn seal(&self, header: &[u8], payload: &[u8], out: &mut Vec<u8>) {
        let key = &self.keys[self.primary.expect("sealing needs a key in use")];
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source failed");
        out.extend_from_slice(&nonce);
        let body = out.len();
        out.extend_from_slice(payload);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[body..],
            )
            .expect("ChaCha20-Poly1305 seals any datagram");
        out.extend_from_slice(tag.as_ref());
    }

    /// Open `sealed` (nonce, ciphertext, tag) with any installed key, the one in use first.
    pub(crate) fn open(&self, header: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Short);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("nonce length");
        let order = self
            .primary
            .into_iter()
            .chain((0..self.keys.len()).filter(|i| Some(*i) != self.primary));
        for i in order {
            let mut buf = body.to_vec();
            if let Ok(plain) = self.keys[i].open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut buf,
            ) {
                let n = plain.len();
                buf.truncate(n);
                return Ok(buf);
            }
        }
        Err(OpenError::NoKey)
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ring.fmt(f)
    }
}

impl Clone for Sealer {
    fn clone(&self) -> Sealer {
        Sealer::new(self.ring.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> GossipKey {
        GossipKey([b; KEY_LEN])
    }

    #[test]
    fn keys_parse_from_base64_and_show_only_a_fingerprint() {
        let k = GossipKey::generate();
        assert_eq!(GossipKey::parse(&k.encode()), Ok(k.clone()));
        assert_eq!(
            GossipKey::parse(&format!(" {}\n", k.encode())),
            Ok(k.clone())
        );
        assert_eq!(k.fingerprint().len(), 16);
        assert!(!format!("{k:?}").contains(&k.encode()));
        for bad in ["", "not base64!", &STANDARD.encode([1u8; 16])] {
            assert_eq!(GossipKey::parse(bad), Err(KeyringError::BadKey), "{bad:?}");
        }
    }

    #[test]
    fn operations_keep_the_rules_and_change_nothing_when_refused() {
        let mut r = Keyring::default();
        assert!(r.accepts_plaintext());
        assert_eq!(
            r.apply(&KeyringOp::AcceptPlaintext(false)),
            Err(KeyringError::NoKeyInUse)
        );
        assert_eq!(
            r.apply(&KeyringOp::Use(key(1))),
            Err(KeyringError::NotInstalled(key(1).fingerprint()))
        );
        r.apply(&KeyringOp::Install(key(1))).unwrap();
        r.apply(&KeyringOp::Install(key(1))).unwrap();
        assert_eq!(r.keys().len(), 1);
        assert_eq!(r.primary(), None);
        r.apply(&KeyringOp::Use(key(1))).unwrap();
        assert_eq!(
            r.apply(&KeyringOp::Remove(key(1))),
            Err(KeyringError::InUse(key(1).fingerprint()))
        );
        r.apply(&KeyringOp::AcceptPlaintext(false)).unwrap();
        let before = r.clone();
        assert_eq!(
            r.apply(&KeyringOp::StopSealing),
            Err(KeyringError::PlaintextRefused)
        );
        assert_eq!(r, before);
        for b in 2..=MAX_KEYS as u8 {
            r.apply(&KeyringOp::Install(key(b))).unwrap();
        }
        assert_eq!(
            r.apply(&KeyringOp::Install(key(99))),
            Err(KeyringError::Full)
        );
        r.apply(&KeyringOp::Remove(key(2))).unwrap();
        r.apply(&KeyringOp::Remove(key(2))).unwrap();
        assert_eq!(r.keys().len(), MAX_KEYS - 1);
    }

    #[test]
    fn the_file_round_trips_and_a_bad_one_is_refused() {
        let mut r = Keyring::with_key(key(1));
        r.apply(&KeyringOp::Install(key(2))).unwrap();
        assert_eq!(Keyring::from_text(&r.to_text()), Ok(r.clone()));
        assert_eq!(
            Keyring::from_text(&Keyring::default().to_text()),
            Ok(Keyring::default())
        );
        let one = key(1).encode();
        for bad in [
            String::new(),
            format!("use {one}\n"),
            format!("plaintext refuse\nkey {one}\n"),
            format!("plaintext maybe\nuse {one}\n"),
            format!("plaintext accept\nuse {one}\nuse {}\n", key(2).encode()),
            "plaintext accept\nkey short\n".to_owned(),
            "plaintext accept\nwhat\n".to_owned(),
        ] {
            assert!(
                matches!(Keyring::from_text(&bad), Err(KeyringError::BadFile(..))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_installed_key_opens_and_others_do_not() {
        let mut a = Keyring::with_key(key(1));
        a.apply(&KeyringOp::Install(key(2))).unwrap();
        let sender = Sealer::new(Keyring::with_key(key(2)));
        let header = b"hdr";
        let mut out = Vec::new();
        sender.seal(header, b"payload", &mut out);
        assert_eq!(out.len(), 7 + SEAL_OVERHEAD);
        let sealed = &out[..];
        assert_eq!(Sealer::new(a).open(header, sealed), Ok(b"payload".to_vec()));
        let other = Sealer::new(Keyring::with_key(key(3)));
        assert_eq!(other.open(header, sealed), Err(OpenError::NoKey));
        // The header is authenticated: moved under another header, nothing opens it.
        assert_eq!(sender.open(b"hdX", sealed), Err(OpenError::NoKey));
        let mut flipped = sealed.to_vec();
        flipped[SEAL_OVERHEAD] ^= 1;
        assert_eq!(sender.open(header, &flipped), Err(OpenError::NoKey));
        assert_eq!(sender.open(header, &sealed[..10]), Err(OpenError::Short));
        assert_eq!(CHACHA20_POLY1305.tag_len() + NONCE_LEN, SEAL_OVERHEAD);
    }
}
