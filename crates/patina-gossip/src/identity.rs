//! A member's identity in SWIM, and foca's codec for it.
//!
//! An identity is the store's origin (the node whose records this member owns), the gossip
//! address (foca's slot: one member per address), the port of its gRPC server on the same
//! IP (anti-entropy, health), and an epoch persisted and bumped at every start and at every
//! renewal, so a restarted or falsely-declared-down agent comes back under an identity that
//! wins over its old one.
//!
//! Every datagram carries two identities and the member updates, so the encoding is compact
//! and hand-framed (exact layout in the tests):
//!
//! ```text
//! identity = node u64 LE | epoch u64 LE | api_port u16 LE | family u8 (4|6) | ip (4|16) | port u16 LE
//! member   = identity | incarnation u16 LE | state u8 (0 alive, 1 suspect, 2 down)
//! header   = src identity | src_incarnation u16 LE | dst identity | message
//! message  = tag u8 | fields (probe numbers u8, identities as above)
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use foca::{Header, Member, Message, State};
use patina_store::NodeId;

/// One agent's identity in the membership: 40 bytes, held once per member by every member
/// (foca's list), so kept compact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The origin of the agent's store: whose records go dark when this member is down.
    pub node: NodeId,
    /// Gossip (UDP) address: one member per address ([`Identity::addr`] as a `SocketAddr`).
    pub addr: PeerAddr,
    /// The gRPC port on `addr`'s IP: anti-entropy and health.
    pub api_port: u16,
    /// Bumped at every start and every renewal; the larger epoch wins an address.
    pub epoch: u64,
}

impl Identity {
    pub fn new(node: NodeId, addr: SocketAddr, api_port: u16, epoch: u64) -> Identity {
        Identity {
            node,
            addr: PeerAddr::from(addr),
            api_port,
            epoch,
        }
    }

    /// The gossip (UDP) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// The gRPC endpoint of this member.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr.ip(), self.api_port)
    }

    /// Where pushed changes go: UDP on the gRPC port's number (TCP and UDP ports are apart),
    /// so pushes never share a receive buffer with SWIM.
    pub fn push_addr(&self) -> SocketAddr {
        self.api_addr()
    }
}

/// A socket address in 19 bytes (a `SocketAddr` takes 32: IPv6's flow label and scope, which
/// the wire does not carry either). Ordered as `SocketAddr` is: IPv4 first, then address,
/// then port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr {
    v6: bool,
    ip: [u8; 16],
    /// Big-endian, so that the derived order is the port's.
    port: [u8; 2],
}

impl PeerAddr {
    pub fn get(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port())
    }

    pub fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        } else {
            let [a, b, c, d, ..] = self.ip;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
    }

    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    pub fn is_ipv4(&self) -> bool {
        !self.v6
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        let mut ip = [0u8; 16];
        let v6 = match a.ip() {
            IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                false
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                true
            }
        };
        PeerAddr {
            v6,
            ip,
            port: a.port().to_be_bytes(),
        }
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<PeerAddr, Self::Err> {
        s.parse::<SocketAddr>().map(PeerAddr::from)
    }
}

impl From<PeerAddr> for SocketAddr {
    fn from(a: PeerAddr) -> SocketAddr {
        a.get()
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.get(), f)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.get(), f)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.node, self.addr, self.epoch)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl foca::Identity for Identity {
    type Addr = PeerAddr;

    fn renew(&self) -> Option<Self> {
        Some(Identity {
            epoch: self.epoch.checked_add(1)?,
            ..*self
        })
    }

    fn addr(&self) -> PeerAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.epoch, self.node) > (other.epoch, other.node)
    }
}

/// Why bytes did not decode. Routine noise from the network: logged at debug and counted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("truncated")]
    Truncated,
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("unknown member state {0}")]
    State(u8),
    #[error("unknown message tag {0}")]
    Tag(u8),
    #[error("buffer too small to encode")]
    NoRoom,
}

/// foca's codec for [`Identity`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

/// Bytes an identity takes on the wire.
pub fn identity_len(id: &Identity) -> usize {
    8 + 8 + 2 + 1 + if id.addr.is_ipv4() { 4 } else { 16 } + 2
}

fn put_identity(id: &Identity, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.node.0.to_le_bytes());
    out.extend_from_slice(&id.epoch.to_le_bytes());
    out.extend_from_slice(&id.api_port.to_le_bytes());
    match id.addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&id.addr.port().to_le_bytes());
}

/// A reader over a byte slice that never panics.
struct Reader<'a, B: bytes::Buf> {
    buf: &'a mut B,
}

impl<B: bytes::Buf> Reader<'_, B> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        if self.buf.remaining() < N {
            return Err(CodecError::Truncated);
        }
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn identity(&mut self) -> Result<Identity, CodecError> {
        let node = NodeId(self.u64()?);
        let epoch = self.u64()?;
        let api_port = self.u16()?;
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.take::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.take::<16>()?)),
            other => return Err(CodecError::Family(other)),
        };
        let port = self.u16()?;
        Ok(Identity::new(
            node,
            SocketAddr::new(ip, port),
            api_port,
            epoch,
        ))
    }
}

const PING: u8 = 1;
const ACK: u8 = 2;
const PING_REQ: u8 = 3;
const INDIRECT_PING: u8 = 4;
const INDIRECT_ACK: u8 = 5;
const FORWARDED_ACK: u8 = 6;
const ANNOUNCE: u8 = 7;
const FEED: u8 = 8;
const GOSSIP: u8 = 9;
const BROADCAST: u8 = 10;
const TURN_UNDEAD: u8 = 11;

fn put_message(m: &Message<Identity>, out: &mut Vec<u8>) {
    match m {
        Message::Ping(n) => out.extend_from_slice(&[PING, *n]),
        Message::Ack(n) => out.extend_from_slice(&[ACK, *n]),
        Message::PingReq {
            target,
            probe_number,
        } => {
            out.push(PING_REQ);
            put_identity(target, out);
            out.push(*probe_number);
        }
        Message::IndirectPing {
            origin,
            probe_number,
        } => {
            out.push(INDIRECT_PING);
            put_identity(origin, out);
            out.push(*probe_number);
        }
        Message::IndirectAck {
            target,
            probe_number,
        } => {
            out.push(INDIRECT_ACK);
            put_identity(target, out);
            out.push(*probe_number);
        }
        Message::ForwardedAck {
            origin,
            probe_number,
        } => {
            out.push(FORWARDED_ACK);
            put_identity(origin, out);
            out.push(*probe_number);
        }
        Message::Announce => out.push(ANNOUNCE),
        Message::Feed => out.push(FEED),
        Message::Gossip => out.push(GOSSIP),
        Message::Broadcast => out.push(BROADCAST),
        Message::TurnUndead => out.push(TURN_UNDEAD),
    }
}

fn state_byte(s: State) -> u8 {
    match s {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    }
}

/// Write `bytes` into `buf` only if it all fits (foca: an encoder must leave the buffer
/// unchanged when the item does not fit).
fn put_all(bytes: &[u8], mut buf: impl bytes::BufMut) -> Result<(), CodecError> {
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError::NoRoom);
    }
    buf.put_slice(bytes);
    Ok(())
}

impl foca::Codec<Identity> for Codec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<Identity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        let mut out = Vec::with_capacity(2 * 37 + 2 + 40);
        put_identity(&header.src, &mut out);
        out.extend_from_slice(&header.src_incarnation.to_le_bytes());
        put_identity(&header.dst, &mut out);
        put_message(&header.message, &mut out);
        put_all(&out, buf)
    }

    fn decode_header(&mut self, mut buf: impl bytes::Buf) -> Result<Header<Identity>, CodecError> {
        let mut r = Reader { buf: &mut buf };
        let src = r.identity()?;
        let src_incarnation = r.u16()?;
        let dst = r.identity()?;
        let message = match r.u8()? {
            PING => Message::Ping(r.u8()?),
            ACK => Message::Ack(r.u8()?),
            PING_REQ => Message::PingReq {
                target: r.identity()?,
                probe_number: r.u8()?,
            },
            INDIRECT_PING => Message::IndirectPing {
                origin: r.identity()?,
                probe_number: r.u8()?,
            },
            INDIRECT_ACK => Message::IndirectAck {
                target: r.identity()?,
                probe_number: r.u8()?,
            },
            FORWARDED_ACK => Message::ForwardedAck {
                origin: r.identity()?,
                probe_number: r.u8()?,
            },
            ANNOUNCE => Message::Announce,
            FEED => Message::Feed,
            GOSSIP => Message::Gossip,
            BROADCAST => Message::Broadcast,
            TURN_UNDEAD => Message::TurnUndead,
            other => return Err(CodecError::Tag(other)),
        };
        Ok(Header {
            src,
            src_incarnation,
            dst,
            message,
        })
    }

    fn encode_member(
        &mut self,
        member: &Member<Identity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), CodecError> {
        let mut out = Vec::with_capacity(40);
        put_identity(member.id(), &mut out);
        out.extend_from_slice(&member.incarnation().to_le_bytes());
        out.push(state_byte(member.state()));
        put_all(&out, buf)
    }

    fn decode_member(&mut self, mut buf: impl bytes::Buf) -> Result<Member<Identity>, CodecError> {
        let mut r = Reader { buf: &mut buf };
        let id = r.identity()?;
        let incarnation = r.u16()?;
        let state = match r.u8()? {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            other => return Err(CodecError::State(other)),
        };
        Ok(Member::new(id, incarnation, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Codec as _;

    fn id(ip: &str, port: u16) -> Identity {
        Identity {
            node: NodeId(0x0102_0304_0506_0708),
            addr: SocketAddr::new(ip.parse().unwrap(), port).into(),
            api_port: 0x0a0b,
            epoch: 3,
        }
    }

    #[test]
    fn an_identity_has_an_exact_layout() {
        let mut out = Vec::new();
        put_identity(&id("127.0.0.2", 0x1234), &mut out);
        assert_eq!(
            out,
            [
                8, 7, 6, 5, 4, 3, 2, 1, // node
                3, 0, 0, 0, 0, 0, 0, 0, // epoch
                0x0b, 0x0a, // api port
                4, 127, 0, 0, 2, // ip
                0x34, 0x12, // port
            ]
        );
        assert_eq!(out.len(), identity_len(&id("127.0.0.2", 0x1234)));
        assert_eq!(identity_len(&id("::1", 1)), 37);
    }

    #[test]
    fn headers_of_every_message_round_trip() {
        let a = id("127.0.0.2", 7000);
        let b = id("::1", 7001);
        let messages = [
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq {
                target: b,
                probe_number: 3,
            },
            Message::IndirectPing {
                origin: a,
                probe_number: 4,
            },
            Message::IndirectAck {
                target: b,
                probe_number: 5,
            },
            Message::ForwardedAck {
                origin: a,
                probe_number: 6,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in messages {
            let header = Header {
                src: a,
                src_incarnation: 513,
                dst: b,
                message,
            };
            let mut buf = Vec::new();
            Codec.encode_header(&header, &mut buf).unwrap();
            let mut slice = &buf[..];
            assert_eq!(Codec.decode_header(&mut slice).unwrap(), header);
            assert!(slice.is_empty(), "the decoder reads exactly one header");
            // Every truncation is an error, never a panic.
            for cut in 0..buf.len() {
                assert!(Codec.decode_header(&buf[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn members_round_trip_and_bad_bytes_are_errors() {
        for state in [State::Alive, State::Suspect, State::Down] {
            let m = Member::new(id("10.0.0.1", 1), 9, state);
            let mut buf = Vec::new();
            Codec.encode_member(&m, &mut buf).unwrap();
            assert_eq!(Codec.decode_member(&buf[..]).unwrap(), m);
        }
        let mut buf = Vec::new();
        Codec
            .encode_member(&Member::alive(id("10.0.0.1", 1)), &mut buf)
            .unwrap();
        let mut bad_state = buf.clone();
        *bad_state.last_mut().unwrap() = 9;
        assert_eq!(
            Codec.decode_member(&bad_state[..]),
            Err(CodecError::State(9))
        );
        let mut bad_family = buf.clone();
        bad_family[18] = 5;
        assert_eq!(
            Codec.decode_member(&bad_family[..]),
            Err(CodecError::Family(5))
        );
    }

    #[test]
    fn an_encoder_leaves_a_full_buffer_untouched() {
        let m = Member::alive(id("10.0.0.1", 1));
        let mut small = [0u8; 10];
        let mut slice = &mut small[..];
        assert_eq!(Codec.encode_member(&m, &mut slice), Err(CodecError::NoRoom));
        assert_eq!(small, [0u8; 10]);
    }

    #[test]
    fn a_renewed_identity_wins_its_address() {
        use foca::Identity as _;
        let a = id("127.0.0.2", 7000);
        let renewed = a.renew().unwrap();
        assert_eq!(renewed.epoch, a.epoch + 1);
        assert!(renewed.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&renewed));
    }
}
