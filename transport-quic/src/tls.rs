//! Identities, fingerprints and the TLS configurations of both sides.
//!
//! Encryption is not optional: every connection is TLS 1.3 inside QUIC. What
//! varies is how each side decides to trust the other:
//!
//! - the client trusts the server through CA roots ([`ClientTls::with_ca_roots_pem_file`]),
//!   a pinned SHA-256 fingerprint ([`ClientTls::pinned`], the usual choice with a
//!   self-signed server), or, only when asked for by name,
//!   [`ClientTls::insecure_skip_verification`];
//! - the server may require a client certificate ([`ClientAuth`]): one of a set of
//!   fingerprints, or one issued by a CA.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::TransportError;

/// The ALPN protocol id: names the protocol and its major version, so a peer
/// speaking anything else fails the TLS handshake instead of a later decode.
pub const ALPN: &[u8] = b"teleport/1";

/// rustls' crypto provider for every connection, TLS and packet protection
/// alike: aws-lc-rs with the `aws-lc-rs` feature (the default), else ring.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc-rs"))]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

/// The SHA-256 hash of a DER certificate: what a client pins and what a server
/// prints at start-up.
///
/// Displayed and parsed as 64 hex digits; [`FromStr`] also accepts the digits in
/// pairs separated by `:` and an optional `sha256:` prefix, as other tools print them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(cert_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares in constant time: fingerprints are not secret, but this costs nothing.
    fn matches(&self, other: &Fingerprint) -> bool {
        bool::from(subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A string that is not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a SHA-256 fingerprint (expected 64 hex digits, optionally in ':'-separated pairs): {0:?}"
)]
pub struct ParseFingerprintError(String);

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let hex = trimmed.strip_prefix("sha256:").unwrap_or(trimmed);
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        let err = || ParseFingerprintError(s.to_owned());
        if digits.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| err())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A certificate chain and its private key: who a side is.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key must never reach a log line.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A new self-signed certificate for `names` (DNS names or IP addresses),
    /// with a fresh ECDSA P-256 key.
    pub fn self_signed<S: Into<String>>(
        names: impl IntoIterator<Item = S>,
    ) -> Result<Identity, TransportError> {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let generated = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TransportError::Certificate(format!("generating a certificate: {e}")))?;
        Ok(Identity {
            chain: vec![generated.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        })
    }

    /// Reads a certificate chain (leaf first) and a private key from PEM files.
    pub fn from_pem_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Identity, TransportError> {
        let cert_path = cert_path.as_ref();
        let key_path = key_path.as_ref();
        let chain = read_certs(cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
            TransportError::Certificate(format!(
                "reading a private key from {}: {e}",
                key_path.display()
            ))
        })?;
        Ok(Identity { chain, key })
    }

    /// Loads the identity from `cert_path` and `key_path` if both exist; otherwise
    /// makes a self-signed one for `names` and saves it there, so the fingerprint
    /// clients pin stays the same across restarts.
    pub fn load_or_create_self_signed<S: Into<String>>(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
        names: impl IntoIterator<Item = S>,
    ) -> Result<Identity, TransportError> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        if cert_path.exists() && key_path.exists() {
            return Identity::from_pem_files(cert_path, key_path);
        }
        let identity = Identity::self_signed(names)?;
        identity.save_pem_files(cert_path, key_path)?;
        Ok(identity)
    }

    /// Writes the chain and the key as PEM. The key file is created readable by
    /// its owner only (on Unix).
    pub fn save_pem_files(
        &self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<(), TransportError> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let mut certs = String::new();
        for cert in &self.chain {
            certs.push_str(&pem("CERTIFICATE", cert.as_ref()));
        }
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let key = pem(label, self.key.secret_der());
        let io = |path: &Path, e: std::io::Error| {
            TransportError::Certificate(format!("writing {}: {e}", path.display()))
        };
        std::fs::write(cert_path, certs).map_err(|e| io(cert_path, e))?;
        write_private(key_path, key.as_bytes()).map_err(|e| io(key_path, e))?;
        Ok(())
    }

    /// The fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(self.chain[0].as_ref())
    }

    /// The leaf certificate, DER encoded.
    pub fn certificate_der(&self) -> &[u8] {
        self.chain[0].as_ref()
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

fn pem(label: &str, der: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(TABLE[((v >> (18 - 6 * i)) & 63) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let err = |e: String| {
        TransportError::Certificate(format!("reading certificates from {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("the file holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn root_store(path: &Path) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| {
            TransportError::Certificate(format!("a CA certificate in {}: {e}", path.display()))
        })?;
    }
    Ok(Arc::new(roots))
}

/// How a client decides to trust the server.
#[derive(Clone)]
enum ServerTrust {
    Roots(Arc<RootCertStore>),
    Pinned(Vec<Fingerprint>),
    Insecure,
}

/// The client's TLS settings: how it trusts the server, and its own certificate
/// when the server asks for one.
#[derive(Clone)]
pub struct ClientTls {
    trust: ServerTrust,
    identity: Option<Identity>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = match &self.trust {
            ServerTrust::Roots(r) => format!("{} CA roots", r.len()),
            ServerTrust::Pinned(p) => format!("pinned {p:?}"),
            ServerTrust::Insecure => "INSECURE: no verification".to_owned(),
        };
        f.debug_struct("ClientTls")
            .field("trust", &trust)
            .field("identity", &self.identity)
            .finish()
    }
}

impl ClientTls {
    /// Trust servers whose certificate chains to a CA in this PEM file, and whose
    /// certificate names the host the client connects to.
    pub fn with_ca_roots_pem_file(path: impl AsRef<Path>) -> Result<ClientTls, TransportError> {
        Ok(ClientTls {
            trust: ServerTrust::Roots(root_store(path.as_ref())?),
            identity: None,
        })
    }

    /// Trust exactly the server whose leaf certificate has this fingerprint
    /// (names and expiry are not checked: the pin is the identity).
    pub fn pinned(fingerprint: Fingerprint) -> ClientTls {
        ClientTls::pinned_any([fingerprint])
    }

    /// Trust any of these fingerprints (for rotating a server's certificate).
    pub fn pinned_any(fingerprints: impl IntoIterator<Item = Fingerprint>) -> ClientTls {
        ClientTls {
            trust: ServerTrust::Pinned(fingerprints.into_iter().collect()),
            identity: None,
        }
    }

    /// Trust any server at all. The connection is still encrypted, but anyone on
    /// the path can impersonate the server. For tests and trusted networks only.
    pub fn insecure_skip_verification() -> ClientTls {
        ClientTls {
            trust: ServerTrust::Insecure,
            identity: None,
        }
    }

    /// Present this certificate when the server asks for one (mutual TLS).
    pub fn with_identity(mut self, identity: Identity) -> ClientTls {
        self.identity = Some(identity);
        self
    }

    /// These settings as a rustls client configuration (TLS 1.3, ALPN
    /// [`ALPN`]): what the QUIC transport uses, and what a TLS-over-TCP
    /// comparison (the benchmark's reference) uses to trust the same server
    /// the same way.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        self.rustls_config_with(provider())
    }

    /// [`rustls_config`](Self::rustls_config) on another crypto provider.
    pub(crate) fn rustls_config_with(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<rustls::ClientConfig, TransportError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let builder = match &self.trust {
            ServerTrust::Roots(roots) => builder.with_root_certificates(roots.clone()),
            ServerTrust::Pinned(pins) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                        pins: Some(pins.clone()),
                        provider,
                    }))
            }
            ServerTrust::Insecure => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                        pins: None,
                        provider,
                    }))
            }
        };
        let mut config = match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| TransportError::Certificate(format!("the client identity: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Which clients a server accepts at the TLS level.
#[derive(Clone, Debug, Default)]
pub enum ClientAuth {
    /// Any client (authenticate with a token, or trust the network).
    #[default]
    None,
    /// Only clients presenting a certificate with one of these fingerprints.
    Fingerprints(Vec<Fingerprint>),
    /// Only clients presenting a certificate issued by a CA in this store.
    Roots(Arc<RootCertStore>),
    /// Clients presenting any certificate. Nothing about the certificate is
    /// trusted, but the handshake signature is verified, so the client holds
    /// the certificate's key: the server learns who the client is
    /// ([`Connection::peer_fingerprint`](crate::Connection::peer_fingerprint))
    /// and decides itself what to make of it (named peers check it against
    /// the fingerprint a peer greets with).
    AnyCertificate,
}

impl ClientAuth {
    /// Only clients whose certificate chains to a CA in this PEM file.
    pub fn ca_roots_pem_file(path: impl AsRef<Path>) -> Result<ClientAuth, TransportError> {
        Ok(ClientAuth::Roots(root_store(path.as_ref())?))
    }
}

/// The server's TLS settings.
#[derive(Clone, Debug)]
pub struct ServerTls {
    identity: Identity,
    client_auth: ClientAuth,
}

impl ServerTls {
    /// Serve with this identity, accepting any client at the TLS level.
    pub fn new(identity: Identity) -> ServerTls {
        ServerTls {
            identity,
            client_auth: ClientAuth::None,
        }
    }

    /// Require client certificates.
    pub fn with_client_auth(mut self, client_auth: ClientAuth) -> ServerTls {
        self.client_auth = client_auth;
        self
    }

    /// The server's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// These settings as a rustls server configuration (TLS 1.3, ALPN
    /// [`ALPN`]); see [`ClientTls::rustls_config`].
    pub fn rustls_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        self.rustls_config_with(provider())
    }

    /// [`rustls_config`](Self::rustls_config) on another crypto provider.
    pub(crate) fn rustls_config_with(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<rustls::ServerConfig, TransportError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let builder = match &self.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Fingerprints(pins) => {
                builder.with_client_cert_verifier(Arc::new(PinnedClientVerifier {
                    pins: Some(pins.clone()),
                    provider,
                }))
            }
            ClientAuth::AnyCertificate => {
                builder.with_client_cert_verifier(Arc::new(PinnedClientVerifier {
                    pins: None,
                    provider,
                }))
            }
            ClientAuth::Roots(roots) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider,
                )
                .build()
                .map_err(|e| TransportError::Tls(format!("client CA roots: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(self.identity.chain.clone(), self.identity.key.clone_key())
            .map_err(|e| TransportError::Certificate(format!("the server identity: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn pinned_error(end_entity: &CertificateDer<'_>, who: &str) -> rustls::Error {
    rustls::Error::General(format!(
        "the {who}'s certificate fingerprint {} is not pinned",
        Fingerprint::of_der(end_entity.as_ref())
    ))
}

fn is_pinned(pins: &[Fingerprint], cert: &CertificateDer<'_>) -> bool {
    let seen = Fingerprint::of_der(cert.as_ref());
    // Check every pin, so the time taken does not depend on which one matched.
    pins.iter().fold(false, |hit, pin| pin.matches(&seen) | hit)
}

/// Checks the server's certificate against pins, or (`pins: None`, only for
/// [`ClientTls::insecure_skip_verification`]) accepts any. Either way the
/// handshake signature is verified, so the connection is bound to the key of the
/// certificate the server presented.
#[derive(Debug)]
struct ServerVerifier {
    pins: Option<Vec<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pins {
            Some(pins) if !is_pinned(pins, end_entity) => Err(pinned_error(end_entity, "server")),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Requires a client certificate with one of the pinned fingerprints.
#[derive(Debug)]
struct PinnedClientVerifier {
    /// `None`: any certificate ([`ClientAuth::AnyCertificate`]).
    pins: Option<Vec<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.pins {
            Some(pins) if !is_pinned(pins, end_entity) => Err(pinned_error(end_entity, "client")),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QUIC connection between `server` and `client` providers: a
    /// handshake with the server's certificate pinned, then one stream
    /// echoed. Both directions of the exchange are encrypted by each side's
    /// own provider.
    #[cfg(feature = "aws-lc-rs")]
    async fn echo_across(server: Arc<CryptoProvider>, client: Arc<CryptoProvider>) {
        use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
        let identity = Identity::self_signed(["localhost"]).unwrap();
        let pin = identity.fingerprint();
        let server_crypto = ServerTls::new(identity).rustls_config_with(server).unwrap();
        let client_crypto = ClientTls::pinned(pin).rustls_config_with(client).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(
                QuicServerConfig::try_from(server_crypto).unwrap(),
            )),
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let connection = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = connection.accept_bi().await.unwrap();
            let got = recv.read_to_end(1 << 20).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
            connection.closed().await;
        });
        let mut client =
            quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_crypto).unwrap(),
        )));
        let connection = client.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(1 << 20).await.unwrap(), payload);
        connection.close(0u32.into(), b"done");
        echo.await.unwrap();
    }

    #[cfg(feature = "aws-lc-rs")]
    #[tokio::test]
    async fn peers_on_ring_and_on_aws_lc_rs_talk_to_each_other() {
        let ring = || Arc::new(rustls::crypto::ring::default_provider());
        let aws_lc = || Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let both_ways = async {
            echo_across(ring(), aws_lc()).await;
            echo_across(aws_lc(), ring()).await;
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), both_ways)
            .await
            .expect("the handshakes and echoes finished");
    }

    #[test]
    fn fingerprint_display_and_parse_round_trip() {
        let fp = Fingerprint::of_der(b"certificate");
        let shown = fp.to_string();
        assert_eq!(shown.len(), 64);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        let paired: Vec<String> = (0..32)
            .map(|i| shown[2 * i..2 * i + 2].to_owned())
            .collect();
        let colons = format!("sha256:{}", paired.join(":").to_uppercase());
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("abc".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn identity_survives_saving_and_loading() {
        let dir = std::env::temp_dir().join(format!("teleport-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let _ = std::fs::remove_file(&cert);
        let _ = std::fs::remove_file(&key);
        let made = Identity::load_or_create_self_signed(&cert, &key, ["localhost"]).unwrap();
        let loaded = Identity::load_or_create_self_signed(&cert, &key, ["localhost"]).unwrap();
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        // Both build working TLS configurations.
        ServerTls::new(loaded).rustls_config().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let id = Identity::self_signed(["localhost"]).unwrap();
        let shown = format!("{id:?}");
        assert!(shown.contains("fingerprint"));
        assert!(!shown.contains("key:"));
    }

    #[test]
    fn missing_files_give_errors_naming_the_path() {
        let err = Identity::from_pem_files("/nonexistent/c.pem", "/nonexistent/k.pem").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
    }
}
