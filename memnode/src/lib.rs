//! memnode
