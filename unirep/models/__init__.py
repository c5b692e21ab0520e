"""Models: timm-registered decathlon ResNets, backbones by name, alignment adapters, the network."""
