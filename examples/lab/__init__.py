"""Network-namespace lab: building blocks shared by the demo and the netns test tier."""
