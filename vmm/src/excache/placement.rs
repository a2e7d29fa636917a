//! Which memory node holds which guest page: stripes of [`STRIPE_PAGES`] consecutive
//! pages, dealt round-robin over the nodes. Stripes keep a sequential stream's
//! pages on one node, so prefetches and write-backs batch.

use fabric::{ClientConfig, ClientError, PageClient};

/// Pages per stripe.
pub const STRIPE_PAGES: u64 = 64;

/// The memory nodes of one VM.
pub struct Placement {
    nodes: Vec<PageClient>,
}

impl Placement {
    /// Connects to every node (in order), failing on the first unreachable one.
    pub fn connect(addrs: &[String], config: &ClientConfig) -> Result<Self, ClientError> {
        let nodes = addrs
            .iter()
            .map(|a| PageClient::connect(a, config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Placement { nodes })
    }

    /// The node index holding page `p` (arena-relative).
    pub fn node_of(&self, p: u64) -> usize {
        ((p / STRIPE_PAGES) % self.nodes.len() as u64) as usize
    }

    /// The client of node `i`.
    pub fn node(&self, i: usize) -> &PageClient {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[PageClient] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stripes_round_robin() {
        // node_of without connections: same arithmetic.
        let n = 3u64;
        let node_of = |p: u64| (p / super::STRIPE_PAGES) % n;
        assert_eq!(node_of(0), 0);
        assert_eq!(node_of(63), 0);
        assert_eq!(node_of(64), 1);
        assert_eq!(node_of(64 * 3), 0);
    }
}
