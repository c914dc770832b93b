//! patina-dns: a DNS front end for stock resolvers, on `dns.listen` (UDP and TCP).
//!
//! - [`answer`]: the zone and the records of each name (sans I/O);
//! - this module: the request handler (hickory-server's request and response types), a rate
//!   bound per client address, and the listeners, loops of our own: UDP (answered inline by
//!   two receiving tasks, no task per query; answers truncated to the client's buffer, 512
//!   bytes without EDNS and at most 1,232 with it, with the TC bit so that it asks again over
//!   TCP) and TCP (bounded connections, idle time and message size).

#![forbid(unsafe_code)]

pub mod answer;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use patina_trust::per_address::PerAddress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

pub use answer::{Outcome, Tier, Zone};

/// The front end's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Queries a second from one client address (a token bucket, with a second's worth of
    /// burst); past it UDP queries are dropped and TCP ones answered REFUSED.
    pub rate_per_client: u32,
    /// Open TCP connections; one more is closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate_per_client: 2000,
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(5),
        }
    }
}

/// What the front end did.
#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub refused: AtomicU64,
    /// Answered SERVFAIL: the agent did not hold its first state yet.
    pub not_ready: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Answered NOTIMP or FORMERR.
    pub other: AtomicU64,
    pub truncated: AtomicU64,
    pub tcp_refused: AtomicU64,
}

/// Token buckets per client address, hashed into a fixed number of slots (memory does not
/// grow with the number of clients; clients that share a slot share its budget).
struct Limiter {
    rate: f64,
    slots: Vec<Mutex<(f64, Instant)>>,
    hasher: std::hash::RandomState,
}

const LIMITER_SLOTS: usize = 4096;

impl Limiter {
    fn new(rate: u32) -> Limiter {
        let now = Instant::now();
        Limiter {
            rate: f64::from(rate.max(1)),
            slots: (0..LIMITER_SLOTS)
                .map(|_| Mutex::new((f64::from(rate.max(1)), now)))
                .collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn allow(&self, ip: IpAddr) -> bool {
        use std::hash::BuildHasher;
        let slot = (self.hasher.hash_one(ip) as usize) % self.slots.len();
        let mut s = self.slots[slot].lock().expect("limiter slot");
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The request handler: one zone.
pub struct Handler {
    zone: Arc<Zone>,
    limiter: Limiter,
    stats: Arc<Stats>,
    turn: AtomicUsize,
}

impl Handler {
    pub fn new(zone: Arc<Zone>, config: &Config, stats: Arc<Stats>) -> Handler {
        Handler {
            zone,
            limiter: Limiter::new(config.rate_per_client),
            stats,
            turn: AtomicUsize::new(0),
        }
    }
}

fn info(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if request.metadata.message_type == MessageType::Response {
            // Never answer a response: a spoofed one between two servers would bounce between
            // them for ever (and over TCP the connection is closed).
            return info(request, ResponseCode::FormErr);
        }
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let udp = request.protocol() == Protocol::Udp;
        let response_edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            r.set_version(0);
            r
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = response_edns.as_ref() {
            builder.edns(e);
        }
        let code = if !self.limiter.allow(request.src().ip()) {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            if udp {
                // Dropped: a spoofed flood gets nothing back to reflect.
                return info(request, ResponseCode::Refused);
            }
            ResponseCode::Refused
        } else if request.metadata.op_code != OpCode::Query {
            self.stats.other.fetch_add(1, Ordering::Relaxed);
            ResponseCode::NotImp
        } else if let Ok(req) = request.request_info() {
            let qname = req.query.name().to_string();
            let qtype = req.query.query_type();
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            match self.zone.answer(&qname, qtype, turn) {
                Outcome::Refused => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    ResponseCode::Refused
                }
                Outcome::NotReady => {
                    self.stats.not_ready.fetch_add(1, Ordering::Relaxed);
                    ResponseCode::ServFail
                }
                Outcome::NxDomain => {
                    self.stats.nxdomain.fetch_add(1, Ordering::Relaxed);
                    let mut metadata = Metadata::response_from_request(&request.metadata);
                    metadata.authoritative = true;
                    metadata.response_code = ResponseCode::NXDomain;
                    let response = builder.build_no_records(metadata);
                    return response_handle
                        .send_response(response)
                        .await
                        .unwrap_or_else(|_| info(request, ResponseCode::ServFail));
                }
                Outcome::Answer {
                    answers,
                    additionals,
                } => {
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                    let mut metadata = Metadata::response_from_request(&request.metadata);
                    metadata.authoritative = true;
                    let response = builder.build(
                        metadata,
                        answers.iter(),
                        std::iter::empty::<&Record>(),
                        std::iter::empty::<&Record>(),
                        additionals.iter(),
                    );
                    return match response_handle.send_response(response).await {
                        Ok(sent) => {
                            if sent.truncation {
                                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                            }
                            sent
                        }
                        Err(_) => info(request, ResponseCode::ServFail),
                    };
                }
            }
        } else {
            self.stats.other.fetch_add(1, Ordering::Relaxed);
            ResponseCode::FormErr
        };
        let response = builder.error_msg(&request.metadata, code);
        response_handle
            .send_response(response)
            .await
            .unwrap_or_else(|_| info(request, ResponseCode::ServFail))
    }
}

/// The largest UDP answer, whatever buffer a client advertises (DNS Flag Day 2020's 1,232
/// bytes: no fragmentation, and little to amplify): past it, TC and TCP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// The listeners' response handler: encodes into a buffer the listener's loop sends; over
/// UDP, truncated (TC) to the response's EDNS payload size, or 512 bytes without EDNS.
#[derive(Clone, Default)]
struct Collect {
    bytes: Arc<Mutex<Vec<u8>>>,
    udp: bool,
}

impl Collect {
    fn new(udp: bool) -> Collect {
        Collect {
            bytes: Arc::default(),
            udp,
        }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.bytes.lock().expect("response buffer"))
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Collect {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = if self.udp {
            response
                .edns()
                .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_PAYLOAD))
        } else {
            u16::MAX
        };
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        *self.bytes.lock().expect("response buffer") = bytes;
        Ok(info)
    }
}

/// Serve `zone` on `udp` and `tcp` until `shutdown` resolves.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    zone: Arc<Zone>,
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let handler = Arc::new(Handler::new(zone, &config, stats.clone()));
    let udp = Arc::new(udp);
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..UDP_TASKS {
        loops.spawn(serve_udp(udp.clone(), handler.clone()));
    }
    loops.spawn(serve_tcp(tcp, handler, config, stats));
    tokio::select! {
        () = shutdown => Ok(()),
        _ = loops.join_next() => Err("a DNS listener ended".into()),
    }
}

/// Tasks receiving on the UDP socket (each answers what it receives before the next).
const UDP_TASKS: usize = 2;

/// UDP: each datagram is parsed, answered and sent in turn; one that does not parse as a
/// DNS message, or comes from port 0, is dropped.
async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<Handler>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                // ICMP errors and the like surface here; a broken socket is not spun on.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if src.port() == 0 || src.ip().is_unspecified() {
            continue;
        }
        let Ok(request) = Request::from_bytes(buf[..n].to_vec(), src, Protocol::Udp) else {
            continue;
        };
        let out = Collect::new(true);
        handler
            .handle_request::<Collect, TokioTime>(&request, out.clone())
            .await;
        let bytes = out.take();
        if !bytes.is_empty() {
            let _ = socket.send_to(&bytes, src).await;
        }
    }
}

/// Open TCP connections from one client address, whatever `max_tcp_connections` allows: one
/// host cannot take every slot (and with them the fallback of truncated answers).
pub const MAX_TCP_PER_CLIENT: usize = 16;

/// TCP: at most `max_tcp_connections` at once, and [`MAX_TCP_PER_CLIENT`] from one address
/// (one more is closed at once); each reads length-prefixed messages, answering each before
/// reading the next, and is closed when a read or a write waits `tcp_idle`, or when a message
/// does not parse.
async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<Handler>,
    config: Config,
    stats: Arc<Stats>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        config.max_tcp_connections.max(1),
    ));
    let per_client = PerAddress::new(MAX_TCP_PER_CLIENT);
    loop {
        let Ok((mut stream, src)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(client) = per_client.take(src.ip()) else {
            stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let idle = config.tcp_idle;
        tokio::spawn(async move {
            let _permit = (permit, client);
            let _ = stream.set_nodelay(true);
            loop {
                let mut len = [0u8; 2];
                match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let len = usize::from(u16::from_be_bytes(len));
                let mut buf = vec![0u8; len];
                match tokio::time::timeout(idle, stream.read_exact(&mut buf)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                if answer_tcp(&handler, buf, src, &mut stream, idle)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

async fn answer_tcp(
    handler: &Handler,
    raw: Vec<u8>,
    src: SocketAddr,
    stream: &mut tokio::net::TcpStream,
    idle: Duration,
) -> Result<(), ()> {
    let request = Request::from_bytes(raw, src, Protocol::Tcp).map_err(|_| ())?;
    let out = Collect::new(false);
    handler
        .handle_request::<Collect, TokioTime>(&request, out.clone())
        .await;
    let bytes = out.take();
    if bytes.is_empty() {
        return Err(());
    }
    let len = u16::try_from(bytes.len()).map_err(|_| ())?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&bytes);
    // A client that sends and never reads is closed, not waited for.
    match tokio::time::timeout(idle, stream.write_all(&framed)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_xds::protocol::Client;
    use patina_xds::resources::{Addr, Host, Locality};

    struct One;

    impl patina_xds::Source for One {
        fn apps(&self) -> Vec<Arc<str>> {
            vec![Arc::from("web")]
        }
        fn exists(&self, app: &str) -> bool {
            app == "web"
        }
        fn localities(&self, _: &str, _: &Client, out: &mut Vec<Locality>) {
            out.push(Locality {
                region: "ord".into(),
                priority: 0,
                weight: 1,
                hosts: vec![Host {
                    addr: Addr::parse("10.0.0.1:80").unwrap(),
                    more: vec![],
                }],
            });
        }
    }

    fn handler(rate: u32) -> Handler {
        let zone = Arc::new(Zone::new(
            Tier::Region("ord".into()),
            "patina",
            Arc::new(One),
            0,
            8,
        ));
        let config = Config {
            rate_per_client: rate,
            ..Config::default()
        };
        Handler::new(zone, &config, Arc::default())
    }

    /// A query for `name` type A; `response`: with the QR bit set.
    fn message(name: &str, response: bool) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, if response { 0x81 } else { 0x01 }, 0, 0, 1];
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    async fn ask(h: &Handler, raw: Vec<u8>, protocol: Protocol) -> Vec<u8> {
        let src: SocketAddr = "192.0.2.7:5353".parse().unwrap();
        let request = Request::from_bytes(raw, src, protocol).unwrap();
        let out = Collect::new(protocol == Protocol::Udp);
        h.handle_request::<Collect, TokioTime>(&request, out.clone())
            .await;
        out.take()
    }

    #[tokio::test]
    async fn responses_are_never_answered_and_queries_are() {
        let h = handler(100);
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let answer = ask(&h, message("web.app.ord.patina", false), protocol).await;
            assert!(answer.len() > 12, "a query is answered");
            assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
            let bounced = ask(&h, message("web.app.ord.patina", true), protocol).await;
            assert!(bounced.is_empty(), "a response got an answer: {bounced:?}");
        }
        assert_eq!(h.stats.answered.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn past_its_rate_a_client_is_dropped_over_udp_and_refused_over_tcp() {
        let h = handler(5);
        let mut answered = 0;
        for _ in 0..20 {
            if !ask(&h, message("web.app.ord.patina", false), Protocol::Udp)
                .await
                .is_empty()
            {
                answered += 1;
            }
        }
        assert!((5..=6).contains(&answered), "{answered} answered of 20");
        let tcp = ask(&h, message("web.app.ord.patina", false), Protocol::Tcp).await;
        assert_eq!(tcp[3] & 0x0f, 5, "REFUSED over TCP");
        assert!(h.stats.rate_limited.load(Ordering::Relaxed) >= 14);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_tcp_connections() {
        let per = PerAddress::new(MAX_TCP_PER_CLIENT);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..MAX_TCP_PER_CLIENT)
            .map(|_| per.take(a).expect("within the share"))
            .collect();
        assert!(per.take(a).is_none(), "one over the share");
        assert!(per.take(b).is_some(), "another address is not held back");
        drop(held);
        assert!(
            per.take(a).is_some(),
            "slots come back when connections close"
        );
        assert_eq!(per.addresses(), 0, "no entry outlives its connections");
    }
}
