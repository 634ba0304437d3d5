//! Durations as Istio and Kubernetes write them (stub)
pub fn parse(_s: &str) -> Result<std::time::Duration, String> { todo!() }
