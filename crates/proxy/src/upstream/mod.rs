//! Everything on the upstream side: clusters, load balancing, connection pools.

pub mod cluster;
pub mod connector;
pub mod health;
pub mod http1;
pub mod outlier;
pub mod pool;
pub(crate) mod read_buffer;
