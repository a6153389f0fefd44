//! Real mutual-TLS handshakes over 127.0.0.1 with a PKI generated fresh per test: who gets in,
//! who is refused, and the identity the server reads.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::pki::{self, InitOptions, PkiLayout, Validity};
use fedinspect_common::tls::{identity_of_peer, PeerIdentity, Role, TlsFiles, TlsMaterial};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIMIT: Duration = Duration::from_secs(5);

fn new_pki(dir: &Path) -> PkiLayout {
    pki::init(dir, &InitOptions::with_plant_count(1)).unwrap()
}

fn server(layout: &PkiLayout) -> Arc<ServerConfig> {
    let material = TlsMaterial::load(&layout.coordinator_files(), Role::Coordinator).unwrap();
    material.server_config().unwrap()
}

fn client(files: &TlsFiles, role: Role) -> Arc<ClientConfig> {
    TlsMaterial::load(files, role)
        .unwrap()
        .client_config()
        .unwrap()
}

fn roots(ca_pem: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// A client config built straight from files, skipping our load-time checks, so a test can
/// present a certificate `TlsMaterial::load` would refuse.
fn unchecked_client(files: &TlsFiles) -> Arc<ClientConfig> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&files.ca_cert))
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// Accepts one connection; on success reads the peer identity and echoes one byte.
async fn serve_once(
    config: Arc<ServerConfig>,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<PeerIdentity, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let identity =
            identity_of_peer(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(identity)
    });
    (addr, task)
}

/// Connects as "localhost", sends one byte and waits for the echo.
async fn talk(config: Arc<ClientConfig>, addr: SocketAddr) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server judges the client certificate after the client's handshake ends,
    // so a refusal surfaces on this first round trip.
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
    assert_eq!(&byte, b"x");
    Ok(())
}

async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<PeerIdentity, String>, Result<(), String>) {
    tokio::time::timeout(LIMIT, async {
        let (addr, task) = serve_once(server).await;
        let client_result = talk(client, addr).await;
        (task.await.unwrap(), client_result)
    })
    .await
    .expect("handshake hung")
}

#[tokio::test]
async fn valid_plant_connects_and_server_reads_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ours = new_pki(dir.path());
    let plant = client(&ours.plant_files("plant-1"), Role::Plant);
    let (served, client_result) = handshake(server(&ours), plant).await;
    client_result.unwrap();
    let id = served.unwrap();
    assert_eq!((id.role, id.id.as_str()), (Role::Plant, "plant-1"));
}

#[tokio::test]
async fn admin_is_read_as_admin() {
    let dir = tempfile::tempdir().unwrap();
    let ours = new_pki(dir.path());
    let admin = client(&ours.admin_files(), Role::Admin);
    let (served, client_result) = handshake(server(&ours), admin).await;
    client_result.unwrap();
    let id = served.unwrap();
    assert_eq!((id.role, id.id.as_str()), (Role::Admin, "admin"));
    assert!(id.require_role(Role::Plant).is_err());
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ours = new_pki(dir.path());
    let theirs = new_pki(other.path());
    // Trusts our CA (so the client side does not give up first) but presents a certificate
    // our CA never issued.
    let intruder = TlsFiles {
        ca_cert: ours.ca_cert(),
        ..theirs.plant_files("plant-1")
    };
    let (served, client_result) = handshake(server(&ours), unchecked_client(&intruder)).await;
    let err = served.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    assert!(client_result.is_err());
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = new_pki(dir.path());
    let files =
        pki::issue_test_plant(ours.root(), "plant-old", Validity::expired(), dir.path()).unwrap();
    let (served, client_result) = handshake(server(&ours), unchecked_client(&files)).await;
    let err = served.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    assert!(client_result.is_err());
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = new_pki(dir.path());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anonymous = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&ours.ca_cert()))
        .with_no_client_auth();
    let (served, client_result) = handshake(server(&ours), Arc::new(anonymous)).await;
    let err = served.unwrap_err();
    assert!(
        err.contains("no certificate") || err.contains("NoCertificates"),
        "{err}"
    );
    assert!(client_result.is_err());
}

#[tokio::test]
async fn client_refuses_server_from_another_ca() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ours = new_pki(dir.path());
    let impostor = new_pki(other.path());
    let plant = client(&ours.plant_files("plant-1"), Role::Plant);
    let (served, client_result) = handshake(server(&impostor), plant).await;
    let err = client_result.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    assert!(served.is_err());
}
