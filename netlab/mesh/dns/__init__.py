"""DNS for the in-pod datapath with DNS capture (inpod reference §1.4 OUT #2/#3, §3.6 "DNS"):
the wire form (:mod:`.codec`), the mesh's names (:mod:`.names`: what istiod's registry says a
Service is called), and the servers (:mod:`.server`): ztunnel's DNS proxy on 15053 inside each
enrolled pod, and the lab's kube-dns stand-in (``netlab.mesh.kubedns``) behind the
``kube-system/kube-dns`` Service, which the pods' ``resolv.conf`` names.
"""
