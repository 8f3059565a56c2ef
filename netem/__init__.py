"""netem: network-emulation profiles in `tc netem` terms, and the links that apply them."""
