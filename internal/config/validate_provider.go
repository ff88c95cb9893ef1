package config

import (
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"text/template"
)

var (
	reAMI      = regexp.MustCompile(`^ami-[0-9a-f]{8,17}$`)
	reSubnet   = regexp.MustCompile(`^subnet-[0-9a-f]{8,17}$`)
	reSG       = regexp.MustCompile(`^sg-[0-9a-f]{8,17}$`)
	reLT       = regexp.MustCompile(`^lt-[0-9a-f]{8,17}$`)
	reInstType = regexp.MustCompile(`^[a-z][a-z0-9-]*\.[a-z0-9]+$`)
	reRegion   = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]$`)
)

// NestedVirtualizationFamilies are the instance families that can run
// nested virtualization (CpuOptions.NestedVirtualization).
var NestedVirtualizationFamilies = []string{"c8i", "m8i", "r8i"}

// Discoveries lists the accepted values of [pool.ec2] discovery.
var Discoveries = []string{"tailscale", "ec2-private-ip", "ec2-public-ip"}

func (v *validator) ec2(p string, e EC2) {
	v.ec2Endpoint(p, e)
	v.ec2Image(p, e)
	v.ec2Placement(p, e)
	v.ec2Instance(p, e)
}

// ec2Endpoint checks the AWS region and API endpoint.
func (v *validator) ec2Endpoint(p string, e EC2) {
	if e.Region == "" {
		v.add(p+"region", `is required; the AWS region, like "eu-central-1"`)
	} else if !reRegion.MatchString(e.Region) {
		v.add(p+"region", "%q is not an AWS region name like \"eu-central-1\"", e.Region)
	}
	if e.Endpoint != "" {
		if u, err := url.Parse(e.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.add(p+"endpoint", "%q is not an http(s) URL; leave it out to use AWS, or give e.g. \"http://127.0.0.1:5000\" for an emulator", e.Endpoint)
		}
	}
	if e.InterruptionQueue != "" {
		if u, err := url.Parse(e.InterruptionQueue); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path == "" || u.Path == "/" {
			v.add(p+"interruption_queue", "%q is not an SQS queue URL like \"https://sqs.eu-central-1.amazonaws.com/123456789012/nix-builders-interruptions\"", e.InterruptionQueue)
		}
	}
}

// interruptionQueues checks that the EC2 pools of one region (and
// endpoint) name the same interruption queue: the daemon runs one
// provider, and so reads one queue, per region.
func (v *validator) interruptionQueues(pools []Pool) {
	type region struct{ name, endpoint string }
	first := map[region]int{}
	for i, pool := range pools {
		if pool.Provider != ProviderEC2 {
			continue
		}
		k := region{pool.EC2.Region, pool.EC2.Endpoint}
		j, seen := first[k]
		if !seen {
			first[k] = i
			continue
		}
		if q := pools[j].EC2.InterruptionQueue; q != pool.EC2.InterruptionQueue {
			v.add(poolKey(i, pool.Name)+".ec2.interruption_queue", "%q differs from pool[%d]'s %q in the same region %s; the pools of a region share one queue: name the same one in each, or none",
				pool.EC2.InterruptionQueue, j, q, pool.EC2.Region)
		}
	}
}

// ec2Image checks the launch template and the AMI.
func (v *validator) ec2Image(p string, e EC2) {
	lt := e.LaunchTemplateID != "" || e.LaunchTemplateName != ""
	switch {
	case e.LaunchTemplateID != "" && e.LaunchTemplateName != "":
		v.add(p+"launch_template_id", "give launch_template_id or launch_template_name, not both")
	case e.LaunchTemplateID != "" && !reLT.MatchString(e.LaunchTemplateID):
		v.add(p+"launch_template_id", "%q is not a launch template id like \"lt-0123456789abcdef0\"", e.LaunchTemplateID)
	}
	switch {
	case e.AMI == "" && !lt:
		v.add(p+"ami", "is required without a launch template; set ami = \"ami-…\" or launch_template_id / launch_template_name")
	case e.AMI != "" && !reAMI.MatchString(e.AMI):
		v.add(p+"ami", "%q is not an AMI id like \"ami-0123456789abcdef0\"", e.AMI)
	}
}

// ec2Placement checks the instance types, subnets and security groups.
func (v *validator) ec2Placement(p string, e EC2) {
	if len(e.InstanceTypes) == 0 {
		v.add(p+"instance_types", `is required; list instance types in order of preference, like ["c7i.2xlarge", "c6i.2xlarge"]`)
	}
	v.list(p+"instance_types", e.InstanceTypes, func(key, t string) {
		if !reInstType.MatchString(t) {
			v.add(key, "%q is not an instance type like \"c7i.large\"", t)
			return
		}
		family, _, _ := strings.Cut(t, ".")
		if e.NestedVirtualization && !slices.Contains(NestedVirtualizationFamilies, family) {
			v.add(key, "%q cannot run nested virtualization; with nested_virtualization = true use the %s families (e.g. \"c8i.2xlarge\")", t, strings.Join(NestedVirtualizationFamilies, ", "))
		}
	})
	if len(e.Subnets) == 0 {
		v.add(p+"subnets", `is required; list one subnet per availability zone, like ["subnet-0123456789abcdef0"]`)
	}
	v.list(p+"subnets", e.Subnets, func(key, s string) {
		if !reSubnet.MatchString(s) {
			v.add(key, "%q is not a subnet id like \"subnet-0123456789abcdef0\"", s)
		}
	})
	v.list(p+"security_groups", e.SecurityGroups, func(key, s string) {
		if !reSG.MatchString(s) {
			v.add(key, "%q is not a security group id like \"sg-0123456789abcdef0\"", s)
		}
	})
}

// ec2Instance checks the instances' root volume, user data and market, and
// how the daemon reaches them.
func (v *validator) ec2Instance(p string, e EC2) {
	if e.RootVolumeGB < 0 || e.RootVolumeGB > 16384 {
		v.add(p+"root_volume_gb", "%d is out of range; give 1..16384 GiB, or 0 for the AMI's size", e.RootVolumeGB)
	}
	if e.UserData != "" {
		if _, err := template.New("user_data").Parse(e.UserData); err != nil {
			v.add(p+"user_data", "is not a valid Go text/template (%s); fix the template syntax", err)
		}
	}
	if e.Market != "" && e.Market != "spot" && e.Market != "on-demand" {
		v.add(p+"market", "%q is not a market; use \"spot\" or \"on-demand\" (or leave it out: spot, on-demand for nested virtualization)", e.Market)
	}
	if e.OnDemandFallback && e.EffectiveMarket() == "on-demand" {
		v.add(p+"on_demand_fallback", "is only meaningful when launches start on spot; remove it or set market = \"spot\"")
	}
	v.duration(p+"unavailable_for", e.UnavailableFor, "5m")
	if !slices.Contains(Discoveries, e.Discovery) {
		v.add(p+"discovery", "%q is not a discovery source; use one of: %s", e.Discovery, strings.Join(Discoveries, ", "))
	}
	if e.SSHPort < 1 || e.SSHPort > 65535 {
		v.add(p+"ssh_port", "%d is not a port; the builders' sshd port, usually 22", e.SSHPort)
	}
}

func (v *validator) tailscale(t Tailscale, used bool) {
	const p = "tailscale."
	if !used {
		return
	}
	v.absPath(p+"socket", t.Socket, `like "/var/run/tailscale/tailscaled.sock"`)
	if t.Hostname == "" {
		v.add(p+"hostname", `is required; the builders' tailnet host name, like "nix-builder-{{.InstanceID}}"`)
	} else if _, err := template.New("hostname").Parse(t.Hostname); err != nil {
		v.add(p+"hostname", "is not a valid Go text/template (%s)", err)
	}
	v.tailscaleCredentials(t)
}

// tailscaleCredentials checks the credentials for deleting devices: an API
// key file, or an OAuth client's id and secret file, or neither.
func (v *validator) tailscaleCredentials(t Tailscale) {
	const p = "tailscale."
	if !t.DeletesDevices() {
		return
	}
	oauth := t.OAuthClientID != "" || t.OAuthClientSecretFile != ""
	switch {
	case t.APIKeyFile != "" && oauth:
		v.add(p+"api_key_file", "is set together with tailscale.oauth_client_id/oauth_client_secret_file; use one: the OAuth client (it does not expire), and remove api_key_file")
	case t.APIKeyFile != "":
		v.absPath(p+"api_key_file", t.APIKeyFile, `like "/run/secrets/tailscale-api-key"`)
	case t.OAuthClientID == "":
		v.add(p+"oauth_client_id", "is required with oauth_client_secret_file; give the OAuth client's id (Tailscale admin console, Settings > OAuth clients), like \"k123456CNTRL\"")
	case t.OAuthClientSecretFile == "":
		v.add(p+"oauth_client_secret_file", `is required with oauth_client_id; give the absolute path of a file holding the client's secret, like "/run/secrets/tailscale-oauth-secret"`)
	default:
		if strings.HasPrefix(strings.TrimSpace(t.OAuthClientID), "tskey-") {
			v.add(p+"oauth_client_id", "looks like a secret (it starts with \"tskey-\"); give the client's id here and put the secret in the file named by oauth_client_secret_file")
		} else if strings.ContainsAny(t.OAuthClientID, " \t\r\n/") {
			v.add(p+"oauth_client_id", "%q is not an OAuth client id; give the id Tailscale shows for the client, like \"k123456CNTRL\"", Clip(t.OAuthClientID))
		}
		v.absPath(p+"oauth_client_secret_file", t.OAuthClientSecretFile, `like "/run/secrets/tailscale-oauth-secret"`)
	}
	if u, err := url.Parse(t.APIURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		v.add(p+"api_url", "%q is not an http(s) URL", t.APIURL)
	}
}

func (v *validator) local(p string, l Local) {
	if l.Address == "" {
		v.add(p+"address", `is required; stand-in builders listen there; use "127.0.0.1"`)
	} else if a, err := netip.ParseAddr(l.Address); err != nil || !a.Is4() || !a.IsLoopback() {
		v.add(p+"address", "%q is not a loopback IPv4 address; use an address in 127.0.0.0/8, like \"127.0.0.1\"", l.Address)
	}
	if l.BootDelay.err != nil {
		v.add(p+"boot_delay", "%q is not a duration; write it like \"30s\" or \"2m\", or \"0s\" for no delay", l.BootDelay.raw)
	} else if l.BootDelay.D() < 0 {
		v.add(p+"boot_delay", "%q is negative; write \"0s\" for no delay, or a positive duration like \"30s\"", l.BootDelay)
	} else {
		v.tooLong(p+"boot_delay", l.BootDelay)
	}
	v.template(p+"launch_command", l.LaunchCommand)
	v.template(p+"terminate_command", l.TerminateCommand)
	switch {
	case l.LaunchCommand != "" && l.TerminateCommand == "":
		v.add(p+"terminate_command", "terminate_command is required when launch_command is set; give the command that stops what launch_command started")
	case l.LaunchCommand == "" && l.TerminateCommand != "":
		v.add(p+"terminate_command", "is used only with launch_command; set launch_command too, or remove terminate_command to use the built-in stand-in builders")
	}
}
