"""The network: plain nn.Modules, no Lightning inside."""
