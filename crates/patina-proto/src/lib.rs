//! Patina's wire types: prost messages and tonic services generated from `proto/` at build
//! time, and the codec they use ([`codec`]). Nothing else lives here; prost types stop at
//! each service edge.

#![forbid(unsafe_code)]

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("patina.v1");
}

/// The encoded `FileDescriptorSet` of every Patina proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patina_descriptor.bin"));
