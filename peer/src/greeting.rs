//! The messages of the peer protocol: ordinary calls of reserved functions,
//! whose arguments and replies are trees (see `docs/peers.md`).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use teleport_quic::Fingerprint;

/// The function a peer calls first on every connection it makes.
pub const HELLO: &str = "_peer.hello";
/// The function asking a peer whether it knows another peer's name.
pub const LOOKUP: &str = "_peer.lookup";
/// The function telling a peer that its greeting was refused.
pub const REFUSE: &str = "_peer.refuse";
/// The prefix of every reserved function name.
pub const RESERVED_PREFIX: &str = "_peer.";

/// The version of the peer protocol this crate speaks.
pub(crate) const PEER_PROTOCOL_VERSION: u32 = 1;
/// At most this many addresses are taken from a greeting or a lookup answer.
pub(crate) const MAX_ADDRS: usize = 16;
/// The longest name a peer may have, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// Who a peer is and where it can be reached: the arguments and the reply of
/// `_peer.hello`, and the answer of `_peer.lookup`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Greeting {
    pub(crate) version: u32,
    pub(crate) name: String,
    /// SHA-256 of the peer's certificate, 64 hex digits.
    pub(crate) fingerprint: String,
    /// Addresses the peer listens on, `ip:port`; an unspecified IP
    /// (`0.0.0.0`, `::`) means "the address you see me connect from".
    pub(crate) addrs: Vec<String>,
}

/// A greeting checked: a valid name, a fingerprint, addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerInfo {
    pub(crate) name: String,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) addrs: Vec<SocketAddr>,
}

impl Greeting {
    pub(crate) fn of(info: &PeerInfo) -> Greeting {
        Greeting {
            version: PEER_PROTOCOL_VERSION,
            name: info.name.clone(),
            fingerprint: info.fingerprint.to_string(),
            addrs: info.addrs.iter().map(SocketAddr::to_string).collect(),
        }
    }

    /// Checks the greeting. `seen_from` replaces unspecified IPs (a peer
    /// listening on every interface does not know which of its addresses
    /// the other side can reach; the one it connected from is a good guess).
    pub(crate) fn check(self, seen_from: Option<IpAddr>) -> Result<PeerInfo, String> {
        if self.version != PEER_PROTOCOL_VERSION {
            return Err(format!(
                "peer protocol version {} (this peer speaks {PEER_PROTOCOL_VERSION})",
                self.version
            ));
        }
        check_name(&self.name)?;
        let fingerprint = self
            .fingerprint
            .parse::<Fingerprint>()
            .map_err(|e| e.to_string())?;
        let mut addrs = Vec::new();
        for addr in self.addrs.iter().take(MAX_ADDRS) {
            let mut addr: SocketAddr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an ip:port address"))?;
            if addr.port() == 0 {
                continue;
            }
            if addr.ip().is_unspecified() {
                match seen_from {
                    Some(ip) => addr.set_ip(ip),
                    None => continue,
                }
            }
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        Ok(PeerInfo {
            name: self.name,
            fingerprint,
            addrs,
        })
    }
}

/// The arguments of `_peer.lookup`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LookupRequest {
    /// The name looked up.
    pub(crate) name: String,
    /// How many more times the asked peer may pass the question on.
    pub(crate) hops: u32,
    /// The names of the peers the question passed through, so that it is
    /// not asked of them again.
    pub(crate) path: Vec<String>,
}

/// The reply of `_peer.lookup`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LookupReply {
    /// The peer's greeting as the answering peer knows it, if it does.
    pub(crate) found: Option<Greeting>,
}

/// The arguments of `_peer.refuse`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RefuseNotice {
    /// The refusing peer's name.
    pub(crate) refused_by: String,
    /// `"NameClash"` or `"Untrusted"`.
    pub(crate) kind: String,
    /// The name refused.
    pub(crate) name: String,
    /// What was found, in words.
    pub(crate) message: String,
}

/// Checks that `name` can be a peer's name.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} cannot be a peer name: it must be 1 to {MAX_NAME_LEN} bytes"
        ));
    }
    Ok(())
}

/// A new name that no other peer has: `peer-` and 128 random bits in hex.
pub(crate) fn random_name() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // The operating system's generator fails only on a broken system;
    // the process identity and the time then still make a name unlikely to
    // repeat.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    let mut name = String::with_capacity(5 + 32);
    name.push_str("peer-");
    for b in bytes {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(addrs: &[&str]) -> Greeting {
        Greeting {
            version: PEER_PROTOCOL_VERSION,
            name: "learner".into(),
            fingerprint: "ab".repeat(32),
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn unspecified_addresses_become_the_address_seen() {
        let seen: IpAddr = "10.0.0.7".parse().unwrap();
        let info = greeting(&["0.0.0.0:4433", "127.0.0.1:5000", "127.0.0.1:0"])
            .check(Some(seen))
            .unwrap();
        let expected: Vec<SocketAddr> = vec![
            "10.0.0.7:4433".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        ];
        assert_eq!(info.addrs, expected);
        // Without an address seen, an unspecified one is dropped.
        let info = greeting(&["0.0.0.0:4433"]).check(None).unwrap();
        assert!(info.addrs.is_empty());
    }

    #[test]
    fn bad_greetings_are_refused_with_a_reason() {
        let mut g = greeting(&[]);
        g.name = String::new();
        assert!(g.check(None).unwrap_err().contains("cannot be a peer name"));
        let mut g = greeting(&[]);
        g.fingerprint = "xyz".into();
        assert!(g.check(None).unwrap_err().contains("fingerprint"));
        let g = greeting(&["not an address"]);
        assert!(g.check(None).unwrap_err().contains("not an ip:port"));
        let mut g = greeting(&[]);
        g.version = 99;
        assert!(g.check(None).unwrap_err().contains("version 99"));
    }

    #[test]
    fn random_names_differ_and_read_as_names() {
        let (a, b) = (random_name(), random_name());
        assert_ne!(a, b);
        assert!(a.starts_with("peer-") && a.len() == 37, "{a}");
        assert!(check_name(&a).is_ok());
    }
}
