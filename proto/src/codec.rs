//! The codec of every trunkfarm gRPC service: prost, with small initial
//! buffers.
//!
//! tonic's default gives each stream 8 KiB to encode and 8 KiB to decode up
//! front. An agent's session is a stream that lives as long as the agent is
//! connected, mostly idle, so those buffers were a third of the hub's memory
//! per connected agent. Every control message fits in [`CODEC_BUFFER_BYTES`];
//! a larger one (an artifact chunk, a job list) grows the buffer as needed.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer per stream, bytes.
pub const CODEC_BUFFER_BYTES: usize = 1024;

/// Encoded bytes a stream collects before yielding to the transport (tonic's
/// default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// prost encoding with [`CODEC_BUFFER_BYTES`] buffers; named by the
/// generated clients and servers (see build.rs).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
