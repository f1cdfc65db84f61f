//! Addresses as people write them: `4433`, `":4433"`, `"localhost:4433"`,
//! `"10.0.0.7:4433"`, `"[::1]:4433"`, `"quic://host:4433"`, or a
//! [`SocketAddr`].
//!
//! Parsing is separate from resolving: a typo fails at once with a message
//! saying what was expected, and a name is looked up only when it is used
//! (each connection attempt resolves again, so a moved server is found).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

/// The URL schemes an address may carry. Only QUIC today; the scheme leaves
/// room for others later.
const SCHEMES: &[&str] = &["quic"];

/// The host part of an [`Address`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// None was written (`4433`, `":4433"`): `localhost` for a client, every
    /// IPv4 interface for a server.
    Unspecified,
    /// An IP address, used as it is.
    Ip(IpAddr),
    /// A name, resolved when it is used.
    Name(String),
}

/// A host (possibly unspecified) and a port. See the [module docs](self) for
/// the forms accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// Where.
    pub host: Host,
    /// The UDP port; 0 lets a server pick a free one.
    pub port: u16,
}

/// An address that could not be parsed or resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// Not in any accepted form.
    #[error(
        "{input:?} is not an address: {reason} (expected a port like 4433, \
         host:port, [ipv6]:port or quic://host:port)"
    )]
    Invalid {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The name did not resolve, or resolved to nothing.
    #[error("cannot resolve {name:?}: {reason}")]
    Unresolved {
        /// The name looked up.
        name: String,
        /// The resolver's message.
        reason: String,
    },
}

impl Address {
    /// An address of `host` and `port`.
    pub fn new(host: Host, port: u16) -> Address {
        Address { host, port }
    }

    /// The host to name in TLS (what the server's certificate must carry) and
    /// in messages: the name or IP as written, `localhost` if none was.
    pub fn host_name(&self) -> String {
        match &self.host {
            Host::Unspecified => "localhost".to_owned(),
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }

    /// The addresses a client tries, every one the name resolves to (IPv4
    /// and IPv6). An unspecified host is `localhost`.
    pub async fn resolve_for_client(&self) -> Result<Vec<SocketAddr>, AddressError> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Unspecified => self.lookup("localhost").await,
            Host::Name(name) => self.lookup(name).await,
        }
    }

    /// The addresses a server may bind, in the resolver's order. An
    /// unspecified host is every IPv4 interface (`0.0.0.0`).
    pub async fn resolve_for_server(&self) -> Result<Vec<SocketAddr>, AddressError> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Unspecified => Ok(vec![SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                self.port,
            )]),
            Host::Name(name) => self.lookup(name).await,
        }
    }

    async fn lookup(&self, name: &str) -> Result<Vec<SocketAddr>, AddressError> {
        let unresolved = |reason: String| AddressError::Unresolved {
            name: name.to_owned(),
            reason,
        };
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, self.port))
            .await
            .map_err(|e| unresolved(e.to_string()))?
            .collect();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(unresolved("the name has no addresses".to_owned()));
        }
        Ok(addrs)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Unspecified => write!(f, ":{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Address, AddressError> {
        let invalid = |reason: &str| AddressError::Invalid {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let mut rest = input.trim();
        if let Some((scheme, after)) = rest.split_once("://") {
            if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
                return Err(invalid(&format!(
                    "unknown scheme {scheme:?} (supported: {})",
                    SCHEMES.join(", ")
                )));
            }
            rest = after.strip_suffix('/').unwrap_or(after);
            if rest.contains('/') || rest.contains('?') {
                return Err(invalid("a path or query is not allowed"));
            }
        }
        if rest.is_empty() {
            return Err(invalid("it is empty"));
        }
        let parse_port = |port: &str| {
            port.parse::<u16>()
                .map_err(|_| invalid(&format!("{port:?} is not a port (0 to 65535)")))
        };
        // A bare port.
        if rest.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Address::new(Host::Unspecified, parse_port(rest)?));
        }
        // `[v6]:port`.
        if let Some(bracketed) = rest.strip_prefix('[') {
            let (ip, port) = bracketed
                .split_once("]:")
                .ok_or_else(|| invalid("an IPv6 address needs a port: [addr]:port"))?;
            let ip: std::net::Ipv6Addr = ip
                .parse()
                .map_err(|_| invalid(&format!("{ip:?} is not an IPv6 address")))?;
            return Ok(Address::new(Host::Ip(ip.into()), parse_port(port)?));
        }
        if rest.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(invalid(
                "write an IPv6 address in brackets with a port: [addr]:port",
            ));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("there is no port"))?;
        let port = parse_port(port)?;
        if host.is_empty() {
            return Ok(Address::new(Host::Unspecified, port));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Address::new(Host::Ip(ip), port));
        }
        let valid_name = host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid_name {
            return Err(invalid(&format!("{host:?} is not a host name")));
        }
        Ok(Address::new(Host::Name(host.to_owned()), port))
    }
}

/// Anything that names an [`Address`]: a port number, a string in one of the
/// accepted forms, a [`SocketAddr`], an `(ip, port)` or `(host, port)` pair.
pub trait ToAddress {
    /// The address, or why this is not one.
    fn to_address(&self) -> Result<Address, AddressError>;
}

impl ToAddress for Address {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(self.clone())
    }
}

impl ToAddress for str {
    fn to_address(&self) -> Result<Address, AddressError> {
        self.parse()
    }
}

impl ToAddress for String {
    fn to_address(&self) -> Result<Address, AddressError> {
        self.parse()
    }
}

impl<T: ToAddress + ?Sized> ToAddress for &T {
    fn to_address(&self) -> Result<Address, AddressError> {
        (**self).to_address()
    }
}

impl ToAddress for SocketAddr {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(Address::new(Host::Ip(self.ip()), self.port()))
    }
}

impl ToAddress for SocketAddrV4 {
    fn to_address(&self) -> Result<Address, AddressError> {
        SocketAddr::V4(*self).to_address()
    }
}

impl ToAddress for SocketAddrV6 {
    fn to_address(&self) -> Result<Address, AddressError> {
        SocketAddr::V6(*self).to_address()
    }
}

impl ToAddress for (IpAddr, u16) {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(Address::new(Host::Ip(self.0), self.1))
    }
}

impl ToAddress for (Ipv4Addr, u16) {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(Address::new(Host::Ip(self.0.into()), self.1))
    }
}

impl ToAddress for (std::net::Ipv6Addr, u16) {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(Address::new(Host::Ip(self.0.into()), self.1))
    }
}

impl ToAddress for (&str, u16) {
    fn to_address(&self) -> Result<Address, AddressError> {
        let host = self.0;
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(Address::new(Host::Ip(ip), self.1));
        }
        format!("{host}:{}", self.1).parse()
    }
}

/// Port numbers of any integer type, so `4433` works as written (an integer
/// literal is an `i32` unless told otherwise).
macro_rules! port_numbers {
    ($($t:ty),*) => {$(
        impl ToAddress for $t {
            fn to_address(&self) -> Result<Address, AddressError> {
                let port = u16::try_from(*self).map_err(|_| AddressError::Invalid {
                    input: self.to_string(),
                    reason: "a port is 0 to 65535".to_owned(),
                })?;
                Ok(Address::new(Host::Unspecified, port))
            }
        }
    )*};
}
port_numbers!(u16, i32, u32, u64, usize, i64);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn parse(s: &str) -> Address {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn every_written_form_parses() {
        let local = Address::new(Host::Unspecified, 4433);
        assert_eq!(parse("4433"), local);
        assert_eq!(parse(":4433"), local);
        assert_eq!(4433.to_address().unwrap(), local);
        assert_eq!(4433u16.to_address().unwrap(), local);
        assert_eq!(
            parse("localhost:4433"),
            Address::new(Host::Name("localhost".into()), 4433)
        );
        assert_eq!(
            parse("gpu-7.example.com:1"),
            Address::new(Host::Name("gpu-7.example.com".into()), 1)
        );
        let v4 = Address::new(Host::Ip(Ipv4Addr::LOCALHOST.into()), 4433);
        assert_eq!(parse("127.0.0.1:4433"), v4);
        assert_eq!(
            SocketAddr::from(([127, 0, 0, 1], 4433))
                .to_address()
                .unwrap(),
            v4
        );
        assert_eq!((Ipv4Addr::LOCALHOST, 4433).to_address().unwrap(), v4);
        assert_eq!(("127.0.0.1", 4433).to_address().unwrap(), v4);
        let v6 = Address::new(Host::Ip(Ipv6Addr::LOCALHOST.into()), 4433);
        assert_eq!(parse("[::1]:4433"), v6);
        assert_eq!(("::1", 4433).to_address().unwrap(), v6);
        assert_eq!(parse("quic://[::1]:4433"), v6);
        assert_eq!(parse("QUIC://127.0.0.1:4433/"), v4);
        assert_eq!(
            parse("quic://host:4433"),
            Address::new(Host::Name("host".into()), 4433)
        );
        assert_eq!(parse("0.0.0.0:0").port, 0);
    }

    #[test]
    fn bad_forms_say_what_is_wrong() {
        for (input, says) in [
            ("", "empty"),
            ("localhost", "no port"),
            ("host:99999", "not a port"),
            ("65536", "not a port"),
            ("::1", "brackets"),
            ("[::1]", "needs a port"),
            ("[zz]:1", "not an IPv6"),
            ("tcp://host:1", "unknown scheme"),
            ("quic://host:1/path", "path"),
            ("bad host:1", "not a host name"),
        ] {
            let e = input.parse::<Address>().unwrap_err();
            assert!(e.to_string().contains(says), "{input:?}: {e}");
        }
        assert!((-1).to_address().is_err());
        assert!(70000.to_address().is_err());
    }

    #[test]
    fn display_reads_back_as_the_same_address() {
        for s in ["4433", "localhost:1", "[::1]:4433", "10.0.0.7:80"] {
            let a = parse(s);
            assert_eq!(parse(&a.to_string()), a);
        }
        assert_eq!(parse("4433").host_name(), "localhost");
        assert_eq!(parse("[::1]:1").host_name(), "::1");
    }

    #[tokio::test]
    async fn names_resolve_and_an_unresolvable_one_fails_at_once() {
        let addrs = parse("localhost:7").resolve_for_client().await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7));
        let local = parse(":7").resolve_for_client().await.unwrap();
        assert_eq!(local, addrs);
        assert_eq!(
            parse(":7").resolve_for_server().await.unwrap(),
            vec![SocketAddr::from(([0, 0, 0, 0], 7))]
        );
        // `.invalid` never resolves (RFC 6761); the resolver answers at once
        // (no network is needed to say so).
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            parse("no-such-host.invalid:1").resolve_for_client(),
        )
        .await
        .expect("the resolver answers")
        .unwrap_err();
        assert!(matches!(e, AddressError::Unresolved { .. }), "{e}");
    }
}
