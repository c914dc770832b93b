//! Who may speak. Certificates name principals by URI ([`principal`]); an agent's and a
//! client's TLS material is read from files and checked whole ([`material`]); small
//! deployments and tests make their certificates here too ([`certs`]).

pub mod certs;
pub mod client;
pub mod material;
pub mod per_address;
pub mod principal;
pub mod reload;
pub mod server;
pub mod signing;

pub use client::Dial;
pub use material::{Material, MaterialError, Paths};
pub use principal::{Grant, Need, Principal, Role, Scope, Tier};
pub use reload::{Expiry, ExpiryReport, Trust};
pub use server::{AuthorizeLayer, PeerInfo, TlsIncoming};
pub use signing::{SignError, Verifier, Vouched};
