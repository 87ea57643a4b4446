//! TLS for the server: PEM loading, SNI certificate selection and the rustls config.
//!
//! `Config.cert_file` / `Config.key_file` are comma-separated PEM paths that pair by
//! index, as in the Go seed. [`CertStore::load`] reads them once when the server
//! starts, so a bad file raises `OSError` / `ValueError` before anything is accepted
//! ([`TlsError::is_os_error`] picks which). [`CertStore`] then chooses a chain for
//! each handshake by SNI, and [`CertStore::reload`] swaps in re-read files without
//! touching connections that are already up.
//!
//! [`server_config`] builds the `rustls::ServerConfig` around the store. It always
//! uses the ring provider passed in explicitly, never the process-wide default, so
//! another library installing a different default cannot change our TLS.
//!
//! # Bounding rustls' write buffer (note for `server.rs`)
//!
//! After `TlsAcceptor::accept(..).await` returns the stream, call
//! `stream.get_mut().1.set_buffer_limit(Some(n))`. Checked on rustls 0.23.46 /
//! tokio-rustls 0.26.6:
//!
//! - `tokio_rustls::server::TlsStream::get_mut()` returns `(&mut IO, &mut
//!   ServerConnection)`, and `ServerConnection` derefs to `ConnectionCommon`, which
//!   has `pub fn set_buffer_limit(&mut self, limit: Option<usize>)`.
//! - The limit bounds two buffers: plaintext written before the handshake finishes,
//!   and encrypted TLS records waiting for the socket. It is checked against
//!   plaintext length, so the record buffer may overshoot by the per-record overhead
//!   (header and AEAD tag, under 30 bytes a record). It applies only to application
//!   data; handshake messages and alerts are never refused. The default is
//!   `Some(64 * 1024)`; `None` means unbounded. It can be changed at any time, even
//!   when the buffer already holds more.
//! - When the buffer is full, tokio-rustls' `poll_write` flushes records to the
//!   socket and returns a short count or `Pending`, so back-pressure reaches the
//!   writer instead of memory growing.
//! - Never pass `Some(0)`: rustls then accepts no bytes and has nothing to flush, so
//!   tokio-rustls' `poll_write` spins forever (tried: a 1-byte write did not return
//!   within 3 s). Use at least `ws_write_buffer`, ideally one full record (16 KiB).
//!
//! (Over 800 lines because a third of it is its unit tests, which generate their own
//! certificates.)

use std::fmt;
use std::io;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, ParsedCertificate, ResolvesServerCert, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How many TLS sessions the server remembers for resumption; past this rustls
/// evicts entries, so the cache cannot grow with the number of clients.
const SESSION_CACHE_SIZE: usize = 256;

/// The only application protocol we speak: WebSocket upgrades ride on HTTP/1.1
/// (RFC 6455 section 4.1). The Go seed advertises the same.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable. Caller's fault (bad path or permissions);
    /// becomes Python `OSError`.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path as given in `cert_file` / `key_file`.
        path: String,
        /// The error the OS reported.
        source: io::Error,
    },
    /// The files were read but their content or the settings are wrong (no
    /// certificate, no key, key does not match, list lengths differ, empty path,
    /// unsupported key type). Caller's fault; becomes Python `ValueError`.
    #[error("{0}")]
    Invalid(String),
}

impl TlsError {
    /// True when this should surface as Python `OSError` rather than `ValueError`.
    pub fn is_os_error(&self) -> bool {
        matches!(self, TlsError::Io { .. })
    }
}

/// Holds the current certificates and picks one per handshake by SNI.
///
/// Entry `i` pairs the `i`-th certificate file with the `i`-th key file. A chain is
/// served for the DNS names in its leaf certificate's SubjectAltName (a wildcard
/// like `*.example.com` matches exactly one label). When several chains match, the
/// first in list order wins, preferring one whose key type the client can verify.
/// When SNI is absent or matches nothing, the first chain is served, as the Go seed
/// does (its `tls.Config.Certificates[0]`).
pub struct CertStore {
    cert_files: Vec<String>,
    key_files: Vec<String>,
    /// Swapped whole by [`CertStore::reload`]; a handshake clones one `Arc` under
    /// the read lock, so it never sees a half-updated list.
    keys: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
}

impl CertStore {
    /// Reads every certificate/key pair and checks each key matches its certificate.
    ///
    /// `cert_files` and `key_files` are comma-separated PEM paths that pair by index;
    /// whitespace around each path is trimmed. A certificate file holds the leaf
    /// first, then any intermediates. A key file holds one PKCS#8, PKCS#1 (RSA) or
    /// SEC1 (EC) key; the first key found is used, so a combined cert+key file also
    /// works. Supported key types are those of the ring provider: RSA (2048 bits or
    /// more), ECDSA P-256 / P-384 and Ed25519.
    ///
    /// # Errors
    ///
    /// [`TlsError::Io`] when a file cannot be read, [`TlsError::Invalid`] for bad
    /// content or mismatched lists.
    pub fn load(cert_files: &str, key_files: &str) -> Result<Arc<CertStore>, TlsError> {
        let cert_files = split_paths(cert_files, "cert_file")?;
        let key_files = split_paths(key_files, "key_file")?;
        if cert_files.len() != key_files.len() {
            return Err(TlsError::Invalid(format!(
                "cert_file and key_file must pair by index: {} certificates vs {} keys",
                cert_files.len(),
                key_files.len()
            )));
        }
        let keys = load_all(&cert_files, &key_files)?;
        Ok(Arc::new(CertStore {
            cert_files,
            key_files,
            keys: RwLock::new(Arc::new(keys)),
        }))
    }

    /// Re-reads the same files and atomically swaps the certificates used by new
    /// handshakes. Established connections keep the certificate they started with.
    ///
    /// # Errors
    ///
    /// As [`CertStore::load`]. On any error the old certificates stay in place.
    pub fn reload(&self) -> Result<(), TlsError> {
        let keys = load_all(&self.cert_files, &self.key_files)?;
        *self.keys.write() = Arc::new(keys);
        Ok(())
    }

    /// Picks the chain for one handshake; see the type docs for the rules.
    ///
    /// `server_name` is the SNI host name; `offered` the client's signature schemes.
    /// Split from `resolve` because rustls' `ClientHello` cannot be built in tests.
    fn choose(
        &self,
        server_name: Option<&str>,
        offered: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let keys = Arc::clone(&self.keys.read());
        let default = keys.first()?;
        if keys.len() == 1 {
            return Some(Arc::clone(default));
        }
        let Some(name) = server_name.and_then(|sni| ServerName::try_from(sni).ok()) else {
            return Some(Arc::clone(default));
        };
        let mut first_match = None;
        for key in keys.iter().filter(|key| serves_name(key, &name)) {
            // Same test rustls applies after we return; the boxed signer is dropped.
            if key.key.choose_scheme(offered).is_some() {
                return Some(Arc::clone(key));
            }
            first_match.get_or_insert(key);
        }
        Some(Arc::clone(first_match.unwrap_or(default)))
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths only: key material must never reach a log line.
        f.debug_struct("CertStore")
            .field("cert_files", &self.cert_files)
            .field("key_files", &self.key_files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(client_hello.server_name(), client_hello.signature_schemes())
    }
}

/// True when the leaf certificate's SubjectAltName covers `name`.
///
/// Uses webpki's own matching (via rustls) rather than a hand-written comparison, so
/// wildcards follow RFC 6125 section 6.4.3 exactly as clients check them. Parsing a
/// leaf is a walk over its DER without allocation; it runs only when more than one
/// chain is configured.
fn serves_name(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.end_entity_cert()
        .ok()
        .and_then(|leaf| ParsedCertificate::try_from(leaf).ok())
        .is_some_and(|leaf| rustls::client::verify_server_name(&leaf, name).is_ok())
}

/// Splits a comma-separated path list, trimming whitespace around each path.
fn split_paths(list: &str, setting: &str) -> Result<Vec<String>, TlsError> {
    let paths: Vec<String> = list.split(',').map(|p| p.trim().to_owned()).collect();
    if paths.iter().any(String::is_empty) {
        return Err(TlsError::Invalid(format!(
            "{setting} has an empty path in {list:?}"
        )));
    }
    Ok(paths)
}

fn load_all(
    cert_files: &[String],
    key_files: &[String],
) -> Result<Vec<Arc<CertifiedKey>>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    cert_files
        .iter()
        .zip(key_files)
        .map(|(cert_file, key_file)| load_pair(cert_file, key_file, &provider).map(Arc::new))
        .collect()
}

fn load_pair(
    cert_file: &str,
    key_file: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(cert_file)?;
    let leaf = &chain[0];
    ParsedCertificate::try_from(leaf).map_err(|e| {
        TlsError::Invalid(format!(
            "{cert_file}: first certificate cannot be parsed: {e}"
        ))
    })?;

    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Invalid(format!(
            "{key_file}: no private key in file (expected a PEM \"PRIVATE KEY\", \
             \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)"
        )),
        e => pem_error(key_file, e),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid(format!("{key_file}: unsupported key type: {e}")))?;

    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::Invalid(format!(
                "{key_file}: private key does not match the certificate in {cert_file}"
            ))
        }
        e => TlsError::Invalid(format!(
            "{key_file}: cannot check the key against {cert_file}: {e}"
        )),
    })?;
    Ok(certified)
}

/// Reads every certificate in a PEM file; the leaf must come first.
fn read_chain(cert_file: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(cert_file, e))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{cert_file}: no certificate in file (expected a PEM \"CERTIFICATE\" block)"
        )));
    }
    Ok(chain)
}

fn pem_error(path: &str, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Io {
            path: path.to_owned(),
            source,
        },
        e => TlsError::Invalid(format!("{path}: invalid PEM: {e}")),
    }
}

/// Builds the server's rustls config around `store`.
///
/// - Provider: ring, passed explicitly (never the process default); its default,
///   safe cipher suites and key-exchange groups.
/// - Versions: TLS 1.3 and TLS 1.2.
/// - No client authentication.
/// - ALPN: `http/1.1` only. A client that offers ALPN without `http/1.1` (e.g. only
///   `h2`) is refused with a `no_application_protocol` alert; one that offers no
///   ALPN is accepted.
/// - Resumption: an in-memory cache of 256 sessions; TLS 1.3 tickets as rustls'
///   default (stateful, backed by that cache; no ticket encryption key).
/// - No 0-RTT and `send_half_rtt_data = false`: nothing is sent before the client's
///   Finished.
///
/// See the module docs for `set_buffer_limit`, to call on each accepted stream.
///
/// # Errors
///
/// [`TlsError::Invalid`] if rustls rejects the provider/version combination (not
/// expected with the ring provider).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Invalid(format!("TLS configuration rejected: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{CertificateParams, KeyPair};
    use rustls::RootCertStore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    // One RSA-2048 and one P-256 key made with openssl, each in two encodings, because
    // rcgen on ring can neither generate RSA keys nor write PKCS#1 / SEC1.
    const RSA_PKCS1: &str = r"-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAnHhfCaGlWQHQaxdA8+A6a0xguSEoTNXqUViPiqSDR+uQ2RwH
STNfpkMjv6ifk+SzpGTnU3QvTrTlqgNkdtcVUC8TkvCYGlnNk07Tk3v2G5MzKXZL
KcsPksAbPTWED9CM1S45igGA7sTkazOsWWvFNuhY3J65G3AkBNWKxEAqThfLeEnK
MueUdaWrYJ+KnRypUA6aPur/LVgoa3HheVHyVCKV9WhH9/PzVQK+RQMQ/6QD9Ehv
cz9j7kNGcRg4PG0KcmUcegBKP4Aq7bCPxBze9wAkeraNl9bJ7yHX6RZPUI2+nkdc
PJLTCsf7PX7YrHBA8jTGa3PwekjkJsd4RBjUnQIDAQABAoIBAETgk+1Yc8HPk6Bg
lx4DmZO8BmPYHbZdAA2Y7273ZjbVkmiP9wEZFUTKD0WCA+UFarK2HEJXRa/e365M
WgAaQ+6NGo+3Sy1mVKFAtNAaZEbVMFNTGFkoYw2VdSgnk5+mjSgWdguzB7+Ten1a
PMcMMr8t3lgXoqJaZfCe07v6BuVi0cw2JkszapAfbf7fyWhcuT63WxqguTy+JRnD
HAZH1K8HH+DI1TP7S3t9ZvOlAJTqRBwghbkBDWN1+y933IpUpdLWHQeT1XI0Bx3B
/wMXSo4wBZHHkgePQJW2tr6S9sJ+yg/tx/4YPVMOwqG1xx40TdoITJPBfwD2rQER
kwQtPP0CgYEAzlYFkYIzbBKkOceL20vtRNBb2FrYPMYXFI7rOPtwbTFohaqyMK4s
tom7M0bLgRAfjuU8u8lHi6RhQa2Ip3s5tIdaDUEfkmWbsybviztI4d4aoF5swV+6
xpZXqAUw6ds0wP/JweXMg4XzewWkDJT9f5lQbION6HP7NUSTrtoB3YMCgYEAwiG5
xKB3n3NTGWzenfexGGt/BlfuV7EdwuOPoafLCwZQi9Vkui+fbzU+D9ML5G6+B7rs
6T09VQFT1kUnOjKx1IQm83MwTpcD7ncaEXjBRKIth25aEu7qeCusO+TW26vEBXvZ
R1o07XX5f5oKH2hkKEoCYjGIWlV14/yUNWkhC18CgYAocbgZs3m831KNeM2zKIjT
ijvWhsgH8ZQolXMJ8k8xOBQSz0iqPhnJlem5vVC6dZyZ99kVvfhmKMxfgVJd8ct3
1WgTXQaBPaVtUl513iMFEvIJKTkMFmWX83QvHQVfcXY/tmOnvBGAXktBe/OR+8pM
rpKTEp5ISCOfZ1fDWDwxXQKBgCyW7IFiTjecmJC1deiYtN+kCTgeyEryDqDt/dam
oLd2itejexBc0eUMOKYP1qJwYUuLPtFP1J+Kv4PuvFTcwgXLGNtAMO9MNoX2a1Fq
CBJIoeaCjUPeBpL1jQjwxf0M1ehgiwadjJyiRV1utzaBlse+QA/nyqbdDEgCgtRF
wmZHAoGBAJqJV4FX5IgJxGuo1miPxH0wK/4tcXi+0hNTkwoqeGYU7Xg8982xdqi2
pu50+s4EA+0CrDkunWO3+g2Z3IlJRzVH1+/Adp2a7g5yXUaE21FZnuu6UkF5xtfR
NdEb9cFOdRYWrAmSq7vBgBzzvGQRc4Z4sEEb27XGUZ6rG0LmhhlJ
-----END RSA PRIVATE KEY-----";
    const RSA_PKCS8: &str = r"-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCceF8JoaVZAdBr
F0Dz4DprTGC5IShM1epRWI+KpINH65DZHAdJM1+mQyO/qJ+T5LOkZOdTdC9OtOWq
A2R21xVQLxOS8JgaWc2TTtOTe/YbkzMpdkspyw+SwBs9NYQP0IzVLjmKAYDuxORr
M6xZa8U26FjcnrkbcCQE1YrEQCpOF8t4Scoy55R1patgn4qdHKlQDpo+6v8tWChr
ceF5UfJUIpX1aEf38/NVAr5FAxD/pAP0SG9zP2PuQ0ZxGDg8bQpyZRx6AEo/gCrt
sI/EHN73ACR6to2X1snvIdfpFk9Qjb6eR1w8ktMKx/s9ftiscEDyNMZrc/B6SOQm
x3hEGNSdAgMBAAECggEAROCT7Vhzwc+ToGCXHgOZk7wGY9gdtl0ADZjvbvdmNtWS
aI/3ARkVRMoPRYID5QVqsrYcQldFr97frkxaABpD7o0aj7dLLWZUoUC00BpkRtUw
U1MYWShjDZV1KCeTn6aNKBZ2C7MHv5N6fVo8xwwyvy3eWBeiolpl8J7Tu/oG5WLR
zDYmSzNqkB9t/t/JaFy5PrdbGqC5PL4lGcMcBkfUrwcf4MjVM/tLe31m86UAlOpE
HCCFuQENY3X7L3fcilSl0tYdB5PVcjQHHcH/AxdKjjAFkceSB49Alba2vpL2wn7K
D+3H/hg9Uw7CobXHHjRN2ghMk8F/APatARGTBC08/QKBgQDOVgWRgjNsEqQ5x4vb
S+1E0FvYWtg8xhcUjus4+3BtMWiFqrIwriy2ibszRsuBEB+O5Ty7yUeLpGFBrYin
ezm0h1oNQR+SZZuzJu+LO0jh3hqgXmzBX7rGlleoBTDp2zTA/8nB5cyDhfN7BaQM
lP1/mVBsg43oc/s1RJOu2gHdgwKBgQDCIbnEoHefc1MZbN6d97EYa38GV+5XsR3C
44+hp8sLBlCL1WS6L59vNT4P0wvkbr4HuuzpPT1VAVPWRSc6MrHUhCbzczBOlwPu
dxoReMFEoi2HbloS7up4K6w75Nbbq8QFe9lHWjTtdfl/mgofaGQoSgJiMYhaVXXj
/JQ1aSELXwKBgChxuBmzebzfUo14zbMoiNOKO9aGyAfxlCiVcwnyTzE4FBLPSKo+
GcmV6bm9ULp1nJn32RW9+GYozF+BUl3xy3fVaBNdBoE9pW1SXnXeIwUS8gkpOQwW
ZZfzdC8dBV9xdj+2Y6e8EYBeS0F785H7ykyukpMSnkhII59nV8NYPDFdAoGALJbs
gWJON5yYkLV16Ji036QJOB7ISvIOoO391qagt3aK16N7EFzR5Qw4pg/WonBhS4s+
0U/Un4q/g+68VNzCBcsY20Aw70w2hfZrUWoIEkih5oKNQ94GkvWNCPDF/QzV6GCL
Bp2MnKJFXW63NoGWx75AD+fKpt0MSAKC1EXCZkcCgYEAmolXgVfkiAnEa6jWaI/E
fTAr/i1xeL7SE1OTCip4ZhTteDz3zbF2qLam7nT6zgQD7QKsOS6dY7f6DZnciUlH
NUfX78B2nZruDnJdRoTbUVme67pSQXnG19E10Rv1wU51FhasCZKru8GAHPO8ZBFz
hniwQRvbtcZRnqsbQuaGGUk=
-----END PRIVATE KEY-----";
    const EC_SEC1: &str = r"-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIOnM4MIpQJJs0W9KAKT0mgSpe4xVJoNKHJw/EXvrA/rCoAoGCCqGSM49
AwEHoUQDQgAEGV7M6jZhTdwjfXz7KAGgXRO8rvU/5ifj6a4mVBWs+feTdY8KsOAj
XMiB0U6YPm1H+BzTdviWRbvOhpRktNBBHQ==
-----END EC PRIVATE KEY-----";
    const EC_PKCS8: &str = r"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6czgwilAkmzRb0oA
pPSaBKl7jFUmg0ocnD8Re+sD+sKhRANCAAQZXszqNmFN3CN9fPsoAaBdE7yu9T/m
J+PpriZUFaz595N1jwqw4CNcyIHRTpg+bUf4HNN2+JZFu86GlGS00EEd
-----END PRIVATE KEY-----";

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("lightws-tls-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, contents: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path.to_str().unwrap().to_owned()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `names`: (cert PEM, key PEM, cert DER).
    struct TestCert {
        cert_pem: String,
        key_pem: String,
        der: CertificateDer<'static>,
    }

    fn cert_with_key(names: &[&str], key: &KeyPair) -> TestCert {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(key)
            .unwrap();
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn test_cert(names: &[&str]) -> TestCert {
        cert_with_key(names, &KeyPair::generate().unwrap())
    }

    /// Writes the pair into `dir` as `<stem>.crt` / `<stem>.key`; returns the paths.
    fn write_pair(dir: &TempDir, stem: &str, cert: &TestCert) -> (String, String) {
        (
            dir.write(&format!("{stem}.crt"), &cert.cert_pem),
            dir.write(&format!("{stem}.key"), &cert.key_pem),
        )
    }

    fn all_schemes() -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }

    /// The leaf the store would serve for this SNI (or none).
    fn served_leaf(store: &CertStore, sni: Option<&str>) -> CertificateDer<'static> {
        store.choose(sni, &all_schemes()).unwrap().cert[0].clone()
    }

    fn invalid_message(err: TlsError) -> String {
        match err {
            TlsError::Invalid(msg) => msg,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn one_pair_loads_and_is_served_for_any_name() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        let store = CertStore::load(&crt, &key).unwrap();
        assert_eq!(served_leaf(&store, Some("a.test")), cert.der);
        assert_eq!(served_leaf(&store, Some("other.test")), cert.der);
        assert_eq!(served_leaf(&store, None), cert.der);
        assert!(format!("{store:?}").contains("a.crt"));
    }

    #[test]
    fn pkcs8_pkcs1_sec1_and_ed25519_keys_all_load() {
        let dir = TempDir::new();
        let rsa = cert_with_key(&["rsa.test"], &KeyPair::from_pem(RSA_PKCS8).unwrap());
        let ec = cert_with_key(&["ec.test"], &KeyPair::from_pem(EC_PKCS8).unwrap());
        let ed = cert_with_key(
            &["ed.test"],
            &KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        );
        let cases = [
            ("rsa-pkcs1", &rsa.cert_pem, RSA_PKCS1),
            ("rsa-pkcs8", &rsa.cert_pem, RSA_PKCS8),
            ("ec-sec1", &ec.cert_pem, EC_SEC1),
            ("ec-pkcs8", &ec.cert_pem, EC_PKCS8),
            ("ed25519-pkcs8", &ed.cert_pem, ed.key_pem.as_str()),
        ];
        for (stem, cert_pem, key_pem) in cases {
            let crt = dir.write(&format!("{stem}.crt"), cert_pem);
            let key = dir.write(&format!("{stem}.key"), key_pem);
            if let Err(e) = CertStore::load(&crt, &key) {
                panic!("{stem}: {e}");
            }
        }
    }

    #[test]
    fn combined_cert_and_key_file_loads() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let both = dir.write("both.pem", &format!("{}\n{}", cert.cert_pem, cert.key_pem));
        CertStore::load(&both, &both).unwrap();
    }

    #[test]
    fn sni_picks_the_matching_chain_and_falls_back_to_the_first() {
        let dir = TempDir::new();
        let a = test_cert(&["a.test", "www.a.test"]);
        let b = test_cert(&["b.test"]);
        let (a_crt, a_key) = write_pair(&dir, "a", &a);
        let (b_crt, b_key) = write_pair(&dir, "b", &b);
        // Whitespace around the commas is ignored.
        let store =
            CertStore::load(&format!("{a_crt} , {b_crt}"), &format!(" {a_key},{b_key} ")).unwrap();
        assert_eq!(served_leaf(&store, Some("b.test")), b.der);
        assert_eq!(served_leaf(&store, Some("www.a.test")), a.der);
        assert_eq!(served_leaf(&store, Some("a.test")), a.der);
        assert_eq!(served_leaf(&store, Some("unknown.test")), a.der);
        assert_eq!(served_leaf(&store, None), a.der);
    }

    #[test]
    fn sni_matching_ignores_case() {
        let dir = TempDir::new();
        let a = test_cert(&["a.test"]);
        let b = test_cert(&["b.test"]);
        let (a_crt, a_key) = write_pair(&dir, "a", &a);
        let (b_crt, b_key) = write_pair(&dir, "b", &b);
        let store =
            CertStore::load(&format!("{a_crt},{b_crt}"), &format!("{a_key},{b_key}")).unwrap();
        assert_eq!(served_leaf(&store, Some("B.Test")), b.der);
    }

    #[test]
    fn wildcard_name_matches_exactly_one_label() {
        let dir = TempDir::new();
        let plain = test_cert(&["plain.test"]);
        let wild = test_cert(&["*.wild.test"]);
        let (p_crt, p_key) = write_pair(&dir, "plain", &plain);
        let (w_crt, w_key) = write_pair(&dir, "wild", &wild);
        let store =
            CertStore::load(&format!("{p_crt},{w_crt}"), &format!("{p_key},{w_key}")).unwrap();
        assert_eq!(served_leaf(&store, Some("api.wild.test")), wild.der);
        assert_eq!(served_leaf(&store, Some("a.b.wild.test")), plain.der);
        assert_eq!(served_leaf(&store, Some("wild.test")), plain.der);
    }

    #[test]
    fn among_matching_chains_one_the_client_can_verify_wins() {
        let dir = TempDir::new();
        let rsa = cert_with_key(&["both.test"], &KeyPair::from_pem(RSA_PKCS8).unwrap());
        let ec = cert_with_key(&["both.test"], &KeyPair::from_pem(EC_PKCS8).unwrap());
        let (r_crt, r_key) = write_pair(&dir, "rsa", &rsa);
        let (e_crt, e_key) = write_pair(&dir, "ec", &ec);
        let store =
            CertStore::load(&format!("{r_crt},{e_crt}"), &format!("{r_key},{e_key}")).unwrap();
        let ecdsa_only = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let leaf = |offered: &[SignatureScheme]| {
            store.choose(Some("both.test"), offered).unwrap().cert[0].clone()
        };
        assert_eq!(leaf(&all_schemes()), rsa.der);
        assert_eq!(leaf(&ecdsa_only), ec.der);
        // Nothing fits: still the first matching chain, and rustls reports the failure.
        assert_eq!(leaf(&[SignatureScheme::ED25519]), rsa.der);
    }

    #[test]
    fn missing_file_is_an_os_error_naming_the_path() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        let missing = dir.0.join("nope.crt").to_str().unwrap().to_owned();

        let err = CertStore::load(&missing, &key).unwrap_err();
        assert!(err.is_os_error());
        assert!(matches!(&err, TlsError::Io { path, .. } if *path == missing));
        assert!(err.to_string().contains(&missing), "{err}");

        let missing_key = dir.0.join("nope.key").to_str().unwrap().to_owned();
        let err = CertStore::load(&crt, &missing_key).unwrap_err();
        assert!(err.is_os_error());
        assert!(err.to_string().contains(&missing_key), "{err}");
    }

    #[test]
    fn file_without_a_certificate_is_invalid() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let key = dir.write("a.key", &cert.key_pem);
        let err = CertStore::load(&key, &key).unwrap_err();
        assert!(!err.is_os_error());
        let msg = invalid_message(err);
        assert!(
            msg.contains("no certificate") && msg.contains(&key),
            "{msg}"
        );
    }

    #[test]
    fn file_without_a_private_key_is_invalid() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let crt = dir.write("a.crt", &cert.cert_pem);
        let msg = invalid_message(CertStore::load(&crt, &crt).unwrap_err());
        assert!(
            msg.contains("no private key") && msg.contains(&crt),
            "{msg}"
        );
    }

    #[test]
    fn unparsable_key_is_an_unsupported_key_type() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let crt = dir.write("a.crt", &cert.cert_pem);
        let key = dir.write(
            "junk.key",
            "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n",
        );
        let msg = invalid_message(CertStore::load(&crt, &key).unwrap_err());
        assert!(
            msg.contains("unsupported key type") && msg.contains(&key),
            "{msg}"
        );
    }

    #[test]
    fn key_that_does_not_match_the_certificate_is_invalid() {
        let dir = TempDir::new();
        let a = test_cert(&["a.test"]);
        let b = test_cert(&["b.test"]);
        let crt = dir.write("a.crt", &a.cert_pem);
        let key = dir.write("b.key", &b.key_pem);
        let msg = invalid_message(CertStore::load(&crt, &key).unwrap_err());
        assert!(msg.contains("does not match"), "{msg}");
        assert!(msg.contains(&crt) && msg.contains(&key), "{msg}");
    }

    #[test]
    fn list_length_mismatch_is_invalid() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        let msg = invalid_message(CertStore::load(&format!("{crt},{crt}"), &key).unwrap_err());
        assert!(msg.contains("2 certificates vs 1 keys"), "{msg}");
    }

    #[test]
    fn empty_path_is_invalid() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        for (certs, keys) in [
            ("", key.as_str()),
            (&format!("{crt},"), &format!("{key},{key}")),
        ] {
            let msg = invalid_message(CertStore::load(certs, keys).unwrap_err());
            assert!(msg.contains("empty path"), "{msg}");
        }
    }

    #[test]
    fn reload_swaps_the_certificate_and_a_failed_reload_keeps_the_old_one() {
        let dir = TempDir::new();
        let old = test_cert(&["a.test"]);
        let new = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &old);
        let store = CertStore::load(&crt, &key).unwrap();
        assert_eq!(served_leaf(&store, None), old.der);

        write_pair(&dir, "a", &new);
        store.reload().unwrap();
        assert_eq!(served_leaf(&store, None), new.der);

        // New certificate, stale key: rejected, the working pair stays.
        dir.write("a.crt", &old.cert_pem);
        let msg = invalid_message(store.reload().unwrap_err());
        assert!(msg.contains("does not match"), "{msg}");
        assert_eq!(served_leaf(&store, None), new.der);

        std::fs::remove_file(&key).unwrap();
        assert!(store.reload().unwrap_err().is_os_error());
        assert_eq!(served_leaf(&store, None), new.der);
    }

    #[test]
    fn server_config_uses_the_documented_settings() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        let config = server_config(CertStore::load(&crt, &key).unwrap()).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(!config.send_half_rtt_data);
        assert_eq!(config.max_early_data_size, 0);
        assert!(config.session_storage.can_cache());
    }

    // ---- end to end over loopback TCP ----

    /// Accepts `n` connections and echoes each until the client closes it.
    async fn echo_server(config: Arc<rustls::ServerConfig>, n: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            for _ in 0..n {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    tls.get_mut().1.set_buffer_limit(Some(16 * 1024));
                    let mut buf = [0u8; 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => tls.write_all(&buf[..n]).await.unwrap(),
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    fn client_config(
        roots: &[&TestCert],
        version: &'static rustls::SupportedProtocolVersion,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut store = RootCertStore::empty();
        for cert in roots {
            store.add(cert.der.clone()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    #[tokio::test]
    async fn tls13_and_tls12_clients_handshake_negotiate_http11_and_echo() {
        let dir = TempDir::new();
        let a = test_cert(&["a.test"]);
        let b = cert_with_key(&["b.test"], &KeyPair::from_pem(RSA_PKCS8).unwrap());
        let (a_crt, a_key) = write_pair(&dir, "a", &a);
        let b_crt = dir.write("b.crt", &b.cert_pem);
        let b_key = dir.write("b.key", RSA_PKCS1);
        let store =
            CertStore::load(&format!("{a_crt},{b_crt}"), &format!("{a_key},{b_key}")).unwrap();
        let cases = [
            (&rustls::version::TLS13, "a.test", &a),
            (&rustls::version::TLS13, "b.test", &b),
            (&rustls::version::TLS12, "a.test", &a),
            (&rustls::version::TLS12, "b.test", &b),
        ];
        let addr = echo_server(server_config(store).unwrap(), cases.len()).await;

        for (version, name, expected) in cases {
            let config = client_config(&[&a, &b], version, &[b"h2", b"http/1.1"]);
            let connector = tokio_rustls::TlsConnector::from(config);
            let tcp = TcpStream::connect(addr).await.unwrap();
            let server_name = ServerName::try_from(name).unwrap();
            let mut tls = connector.connect(server_name, tcp).await.unwrap();

            let conn = tls.get_ref().1;
            assert_eq!(conn.protocol_version(), Some(version.version));
            assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
            assert_eq!(conn.peer_certificates().unwrap()[0], expected.der, "{name}");

            tls.write_all(b"hello over tls").await.unwrap();
            let mut echoed = [0u8; 14];
            tls.read_exact(&mut echoed).await.unwrap();
            assert_eq!(&echoed, b"hello over tls");
            tls.shutdown().await.unwrap();
        }
    }

    #[tokio::test]
    async fn client_offering_only_h2_is_refused() {
        let dir = TempDir::new();
        let cert = test_cert(&["a.test"]);
        let (crt, key) = write_pair(&dir, "a", &cert);
        let config = server_config(CertStore::load(&crt, &key).unwrap()).unwrap();
        let addr = echo_server(config, 1).await;
        let connector = tokio_rustls::TlsConnector::from(client_config(
            &[&cert],
            &rustls::version::TLS13,
            &[b"h2"],
        ));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let result = connector
            .connect(ServerName::try_from("a.test").unwrap(), tcp)
            .await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("NoApplicationProtocol"), "{err}");
    }
}
