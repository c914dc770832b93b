//! mTLS end to end over loopback: a tonic server behind `TlsIncoming` and `AuthorizeLayer`,
//! clients through `Dial`. Who is let in, who is refused and where, and a rotation.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use std::time::Duration;

use patina_trust::certs::{Authority, Leaf};
use patina_trust::{AuthorizeLayer, Dial, Grant, Material, Role, Scope, Tier, TlsIncoming, Trust};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn material(ca: &Authority, cas: &str, grants: Vec<Grant>) -> Material {
    let issued = ca
        .issue(&Leaf {
            name: "t".into(),
            grants,
            ips: vec!["127.0.0.1".parse().unwrap()],
            valid_for: Duration::from_secs(3600),
            ..Leaf::default()
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = patina_trust::Paths {
        ca: dir.path().join("ca"),
        cert: dir.path().join("cert"),
        key: dir.path().join("key"),
    };
    std::fs::write(&paths.ca, cas).unwrap();
    std::fs::write(&paths.cert, issued.cert_pem).unwrap();
    std::fs::write(&paths.key, issued.key_pem).unwrap();
    Material::load(&paths).unwrap()
}

fn ord() -> Scope {
    Scope::new(Tier::Region, "ord")
}

async fn serve(trust: Trust) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = TlsIncoming::new(
        TcpListenerStream::new(listener),
        trust,
        Duration::from_secs(5),
    );
    tokio::spawn(
        Server::builder()
            .layer(AuthorizeLayer::new(ord()))
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

async fn check(dial: &Dial, url: &str) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let channel = dial.connect(endpoint).await.map_err(|e| format!("{e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn only_certificates_of_the_bundle_get_in_and_only_to_the_cluster_meant() {
    let ca = Authority::generate("ca", Duration::from_secs(7200)).unwrap();
    let other = Authority::generate("other", Duration::from_secs(7200)).unwrap();
    let agent = vec![Grant::new(Tier::Region, "ord", Role::Agent)];
    let url = serve(Trust::fixed(material(&ca, ca.cert_pem(), agent.clone()))).await;

    let reader = Trust::fixed(material(
        &ca,
        ca.cert_pem(),
        vec![Grant::new(Tier::Region, "ord", Role::Reader)],
    ));
    check(&Dial::tls(reader.clone(), ord()), &url)
        .await
        .unwrap();

    // A client that expects another cluster's agent refuses this server.
    let err = check(&Dial::tls(reader, Scope::new(Tier::Region, "fra")), &url)
        .await
        .unwrap_err();
    assert!(
        err.contains("WrongServer") && err.contains("region/fra"),
        "{err}"
    );

    // A client certificate of another CA (which trusts ours, so only the server refuses).
    let both = format!("{}{}", ca.cert_pem(), other.cert_pem());
    let stranger = Trust::fixed(material(&other, &both, agent.clone()));
    assert!(check(&Dial::tls(stranger, ord()), &url).await.is_err());

    // No TLS at all.
    assert!(check(&Dial::Plain, &url).await.is_err());

    // TLS without a client certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the server's refusal arrives with the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    assert!(
        refused.await.is_err(),
        "a client without a certificate got in"
    );
}

#[tokio::test]
async fn a_server_rotated_to_a_new_ca_is_taken_by_clients_that_trust_both() {
    let dir = tempfile::tempdir().unwrap();
    let old = Authority::generate("old", Duration::from_secs(7200)).unwrap();
    let new = Authority::generate("new", Duration::from_secs(7200)).unwrap();
    let both = format!("{}{}", old.cert_pem(), new.cert_pem());
    let agent = vec![Grant::new(Tier::Region, "ord", Role::Agent)];
    let issue = |ca: &Authority| {
        ca.issue(&Leaf {
            name: "agent".into(),
            grants: agent.clone(),
            valid_for: Duration::from_secs(3600),
            ..Leaf::default()
        })
        .unwrap()
    };
    let paths = patina_trust::Paths {
        ca: dir.path().join("ca"),
        cert: dir.path().join("cert"),
        key: dir.path().join("key"),
    };
    let first = issue(&old);
    std::fs::write(&paths.ca, &both).unwrap();
    std::fs::write(&paths.cert, &first.cert_pem).unwrap();
    std::fs::write(&paths.key, &first.key_pem).unwrap();
    let server = Trust::follow_every(paths.clone(), Duration::from_millis(20)).unwrap();
    let url = serve(server.clone()).await;
    // A client of the old CA only, and one of the new CA trusting both.
    let old_client = Trust::fixed(material(&old, old.cert_pem(), agent.clone()));
    let new_client = Trust::fixed(material(&new, &both, agent.clone()));
    check(&Dial::tls(old_client.clone(), ord()), &url)
        .await
        .unwrap();
    check(&Dial::tls(new_client.clone(), ord()), &url)
        .await
        .unwrap();

    let mut changes = server.changes();
    changes.borrow_and_update();
    let second = issue(&new);
    std::fs::write(&paths.key, &second.key_pem).unwrap();
    std::fs::write(&paths.cert, &second.cert_pem).unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    // The new server certificate: clients trusting the new CA go on; one trusting only the
    // old CA refuses it (which is why a CA rotates in steps: bundles first).
    check(&Dial::tls(new_client, ord()), &url).await.unwrap();
    assert!(check(&Dial::tls(old_client, ord()), &url).await.is_err());
}
