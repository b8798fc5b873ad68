"""FastDVDnet: the network, its upstream checkpoint loader and its sliding-window rule."""
