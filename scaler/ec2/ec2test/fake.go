// Package ec2test is an in-process, stateful EC2 for tests of the EC2
// provider and of the daemon built on it: it launches, describes (with tag
// and state filters and pagination) and terminates instances, answers
// capacity shortages and injected errors the way EC2 does, and records
// every call.
package ec2test

import (
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
)

// Operation names of Call.Op and of FailNext.
const (
	OpRun       = "RunInstances"
	OpDescribe  = "DescribeInstances"
	OpTerminate = "TerminateInstances"
)

// Error codes the fake produces itself.
const (
	CodeCapacity    = "InsufficientInstanceCapacity"
	CodeThrottle    = "RequestLimitExceeded"
	CodeNotFound    = "InvalidInstanceID.NotFound"
	CodeMismatch    = "IdempotentParameterMismatch"
	CodeInvalid     = "InvalidParameterValue"
	CodeMissing     = "MissingParameter"
	ReasonUser      = "Client.UserInitiatedShutdown"
	ReasonSpot      = "Server.SpotInstanceTermination"
	defaultPageSize = 1000
)

// APIError is an EC2 error with code and message, as the SDK returns it.
func APIError(code, msg string) error {
	return &smithy.GenericAPIError{Code: code, Message: msg, Fault: smithy.FaultClient}
}

// Call is one recorded call: Input is the *ec2.XxxInput, Err what the fake
// answered.
type Call struct {
	Op    string
	Input any
	Err   error
}

// Fake is a stateful EC2 implementing the provider's API. The zero value
// is not usable; call New. Set the exported fields before use.
type Fake struct {
	// Now is the clock for LaunchTime (nil: time.Now).
	Now func() time.Time
	// PageSize caps DescribeInstances pages below the request's MaxResults
	// (0: MaxResults, or 1000).
	PageSize int
	// BootDescribes is how many DescribeInstances calls a new instance
	// stays pending for; it is running from the one after (0: running at
	// the first DescribeInstances after launch).
	BootDescribes int
	// PublicIPs gives every instance a public address too.
	PublicIPs bool
	// Zones maps subnet ids to availability zones; an unknown subnet gets
	// "us-east-1a", "us-east-1b", ... in order of first use.
	Zones map[string]string
	// Hooks run at the start of every call of their kind; an error they
	// return is the call's answer (and nothing changes).
	RunHook       func(in *ec2.RunInstancesInput) error
	DescribeHook  func(in *ec2.DescribeInstancesInput) error
	TerminateHook func(in *ec2.TerminateInstancesInput) error

	mu        sync.Mutex
	instances []*instance // in launch order
	byID      map[string]*instance
	tokens    map[string]tokenUse
	fail      map[string][]error
	noCap     []offering
	calls     []Call
	seq       int
}

type instance struct {
	inst      types.Instance
	volTags   []types.Tag
	describes int // DescribeInstances calls since launch
}

type tokenUse struct {
	params string // fingerprint of the request
	out    *ec2.RunInstancesOutput
	err    error
}

type offering struct{ market, typ, subnet string }

// New returns an empty fake EC2.
func New() *Fake {
	return &Fake{
		Zones:  map[string]string{},
		byID:   map[string]*instance{},
		tokens: map[string]tokenUse{},
		fail:   map[string][]error{},
	}
}

func (f *Fake) now() time.Time {
	if f.Now != nil {
		return f.Now()
	}
	return time.Now()
}

// FailNext makes the next n calls of op answer err.
func (f *Fake) FailNext(op string, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for range n {
		f.fail[op] = append(f.fail[op], err)
	}
}

// NoCapacity makes RunInstances answer InsufficientInstanceCapacity for an
// offering: market ("spot" or "on-demand"), instance type and subnet; an
// empty field matches anything.
func (f *Fake) NoCapacity(market, instanceType, subnet string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noCap = append(f.noCap, offering{market, instanceType, subnet})
}

// RestoreCapacity undoes every NoCapacity.
func (f *Fake) RestoreCapacity() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noCap = nil
}

// Calls returns the calls so far.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// RunInputs returns the inputs of every RunInstances call so far, failed
// ones included.
func (f *Fake) RunInputs() []*ec2.RunInstancesInput {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*ec2.RunInstancesInput
	for _, c := range f.calls {
		if in, ok := c.Input.(*ec2.RunInstancesInput); ok {
			out = append(out, in)
		}
	}
	return out
}

// CallCount counts the calls of op so far.
func (f *Fake) CallCount(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c.Op == op {
			n++
		}
	}
	return n
}

// Instances returns every instance, terminated ones included, in launch
// order.
func (f *Fake) Instances() []types.Instance {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]types.Instance, 0, len(f.instances))
	for _, i := range f.instances {
		out = append(out, i.inst)
	}
	return out
}

// Instance returns one instance.
func (f *Fake) Instance(id string) (types.Instance, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.byID[id]
	if !ok {
		return types.Instance{}, false
	}
	return i.inst, true
}

// VolumeTags returns the tags the launch put on an instance's volumes.
func (f *Fake) VolumeTags(id string) []types.Tag {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i, ok := f.byID[id]; ok {
		return slices.Clone(i.volTags)
	}
	return nil
}

// Add inserts an instance as it is (e.g. one without tags, or of another
// cluster). An empty InstanceId gets a fresh one, which Add returns.
func (f *Fake) Add(in types.Instance) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if in.InstanceId == nil {
		in.InstanceId = aws.String(f.newID())
	}
	if in.State == nil {
		in.State = state(types.InstanceStateNameRunning)
	}
	if in.LaunchTime == nil {
		in.LaunchTime = aws.Time(f.now())
	}
	i := &instance{inst: in, describes: f.BootDescribes + 1}
	f.instances = append(f.instances, i)
	f.byID[*in.InstanceId] = i
	return *in.InstanceId
}

// SetState puts an instance into a state, with a StateReason code ("" for
// none).
func (f *Fake) SetState(id string, name types.InstanceStateName, reason string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.byID[id]
	if !ok {
		panic("ec2test: SetState of unknown instance " + id)
	}
	i.inst.State = state(name)
	i.describes = f.BootDescribes + 1 // no automatic pending → running any more
	i.inst.StateReason = nil
	if reason != "" {
		i.inst.StateReason = &types.StateReason{Code: aws.String(reason), Message: aws.String(reason)}
	}
}

// Interrupt reclaims a Spot instance: terminated, StateReason
// Server.SpotInstanceTermination.
func (f *Fake) Interrupt(id string) {
	f.SetState(id, types.InstanceStateNameTerminated, ReasonSpot)
}

func state(name types.InstanceStateName) *types.InstanceState {
	codes := map[types.InstanceStateName]int32{"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
	return &types.InstanceState{Name: name, Code: aws.Int32(codes[name])}
}

func (f *Fake) newID() string {
	f.seq++
	return fmt.Sprintf("i-%017x", 0xf00000+f.seq)
}

// record appends a call; the caller holds mu.
func (f *Fake) record(op string, in any, err error) {
	f.calls = append(f.calls, Call{Op: op, Input: in, Err: err})
}

// injected pops an error queued by FailNext; the caller holds mu.
func (f *Fake) injected(op string) error {
	q := f.fail[op]
	if len(q) == 0 {
		return nil
	}
	f.fail[op] = q[1:]
	return q[0]
}

// RunInstances launches one instance per call (MinCount = MaxCount = 1 are
// required), honouring ClientToken idempotency like EC2.
func (f *Fake) RunInstances(ctx context.Context, in *ec2.RunInstancesInput, _ ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error) {
	if f.RunHook != nil {
		if err := f.RunHook(in); err != nil {
			f.mu.Lock()
			f.record(OpRun, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.run(ctx, in)
	f.record(OpRun, in, err)
	return out, err
}

func (f *Fake) run(ctx context.Context, in *ec2.RunInstancesInput) (*ec2.RunInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpRun); err != nil {
		return nil, err
	}
	if aws.ToInt32(in.MinCount) != 1 || aws.ToInt32(in.MaxCount) != 1 {
		return nil, APIError(CodeInvalid, "the fake launches exactly one instance per call (MinCount = MaxCount = 1)")
	}
	if in.ImageId == nil && in.LaunchTemplate == nil {
		return nil, APIError(CodeMissing, "The request must contain the parameter ImageId")
	}
	if in.InstanceType == "" && in.LaunchTemplate == nil {
		return nil, APIError(CodeMissing, "The request must contain the parameter InstanceType")
	}
	if ud := aws.ToString(in.UserData); ud != "" {
		if _, err := base64.StdEncoding.DecodeString(ud); err != nil {
			return nil, APIError(CodeInvalid, "Invalid BASE64 encoding of user data.")
		}
	}
	market := "on-demand"
	if in.InstanceMarketOptions != nil && in.InstanceMarketOptions.MarketType == types.MarketTypeSpot {
		market = "spot"
	}
	typ, subnet := string(in.InstanceType), aws.ToString(in.SubnetId)
	fp := fingerprint(in)
	tok := aws.ToString(in.ClientToken)
	if use, ok := f.tokens[tok]; ok && tok != "" {
		if use.params != fp {
			return nil, APIError(CodeMismatch, "The client token "+tok+" was used with different parameters.")
		}
		return use.out, use.err
	}
	for _, o := range f.noCap {
		if (o.market == "" || o.market == market) && (o.typ == "" || o.typ == typ) && (o.subnet == "" || o.subnet == subnet) {
			err := APIError(CodeCapacity, fmt.Sprintf("We currently do not have sufficient %s capacity in the Availability Zone you requested (%s).", typ, f.zone(subnet)))
			if tok != "" {
				// EC2 remembers the token of a failed launch too: reusing
				// it for another offering is IdempotentParameterMismatch.
				f.tokens[tok] = tokenUse{params: fp, err: err}
			}
			return nil, err
		}
	}
	var tags, volTags []types.Tag
	for _, ts := range in.TagSpecifications {
		switch ts.ResourceType {
		case types.ResourceTypeInstance:
			tags = append(tags, ts.Tags...)
		case types.ResourceTypeVolume:
			volTags = append(volTags, ts.Tags...)
		}
	}
	id := f.newID()
	inst := types.Instance{
		InstanceId:       aws.String(id),
		InstanceType:     in.InstanceType,
		ImageId:          in.ImageId,
		State:            state(types.InstanceStateNamePending),
		LaunchTime:       aws.Time(f.now().UTC()),
		Placement:        &types.Placement{AvailabilityZone: aws.String(f.zone(subnet))},
		SubnetId:         in.SubnetId,
		PrivateIpAddress: aws.String(fmt.Sprintf("10.0.%d.%d", f.seq/250, f.seq%250+4)),
		Tags:             tags,
		KeyName:          in.KeyName,
	}
	if f.PublicIPs {
		inst.PublicIpAddress = aws.String(fmt.Sprintf("198.51.100.%d", f.seq%250+1))
	}
	if market == "spot" {
		inst.InstanceLifecycle = types.InstanceLifecycleTypeSpot
		inst.SpotInstanceRequestId = aws.String(fmt.Sprintf("sir-%08x", f.seq))
	}
	if in.MetadataOptions != nil {
		inst.MetadataOptions = &types.InstanceMetadataOptionsResponse{
			HttpTokens:   in.MetadataOptions.HttpTokens,
			HttpEndpoint: in.MetadataOptions.HttpEndpoint,
		}
	}
	if in.CpuOptions != nil {
		inst.CpuOptions = &types.CpuOptions{NestedVirtualization: in.CpuOptions.NestedVirtualization}
	}
	for _, g := range in.SecurityGroupIds {
		inst.SecurityGroups = append(inst.SecurityGroups, types.GroupIdentifier{GroupId: aws.String(g)})
	}
	f.instances = append(f.instances, &instance{inst: inst, volTags: volTags})
	f.byID[id] = f.instances[len(f.instances)-1]
	out := &ec2.RunInstancesOutput{
		ReservationId: aws.String(fmt.Sprintf("r-%017x", f.seq)),
		Instances:     []types.Instance{inst},
	}
	if tok != "" {
		f.tokens[tok] = tokenUse{params: fp, out: out}
	}
	return out, nil
}

// fingerprint is what EC2 compares when a client token comes again.
func fingerprint(in *ec2.RunInstancesInput) string {
	lt := ""
	if in.LaunchTemplate != nil {
		lt = aws.ToString(in.LaunchTemplate.LaunchTemplateId) + aws.ToString(in.LaunchTemplate.LaunchTemplateName) + "@" + aws.ToString(in.LaunchTemplate.Version)
	}
	market := ""
	if in.InstanceMarketOptions != nil {
		market = string(in.InstanceMarketOptions.MarketType)
	}
	return strings.Join([]string{string(in.InstanceType), aws.ToString(in.SubnetId), market, aws.ToString(in.ImageId), lt, aws.ToString(in.UserData)}, "|")
}

func (f *Fake) zone(subnet string) string {
	if z, ok := f.Zones[subnet]; ok {
		return z
	}
	z := "us-east-1" + string(rune('a'+len(f.Zones)%26))
	f.Zones[subnet] = z
	return z
}

// DescribeInstances answers by InstanceIds (InvalidInstanceID.NotFound if
// one is unknown) and Filters: tag:<key>, tag-key, instance-state-name,
// instance-id, instance-type, subnet-id; other filter names are
// InvalidParameterValue. Pages follow MaxResults (and PageSize); one
// instance per reservation.
func (f *Fake) DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, _ ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error) {
	if f.DescribeHook != nil {
		if err := f.DescribeHook(in); err != nil {
			f.mu.Lock()
			f.record(OpDescribe, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.describe(ctx, in)
	f.record(OpDescribe, in, err)
	return out, err
}

func (f *Fake) describe(ctx context.Context, in *ec2.DescribeInstancesInput) (*ec2.DescribeInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpDescribe); err != nil {
		return nil, err
	}
	if len(in.InstanceIds) > 0 && in.MaxResults != nil {
		return nil, APIError(CodeInvalid, "The parameter instancesSet cannot be used with the parameter maxResults")
	}
	if mr := in.MaxResults; mr != nil && (*mr < 5 || *mr > 1000) {
		return nil, APIError(CodeInvalid, fmt.Sprintf("Value ( %d ) for parameter maxResults is invalid. Expecting a value between 5 and 1000.", *mr))
	}
	for _, id := range in.InstanceIds {
		if _, ok := f.byID[id]; !ok {
			return nil, APIError(CodeNotFound, fmt.Sprintf("The instance ID '%s' does not exist", id))
		}
	}
	for _, i := range f.instances {
		i.describes++
		if i.inst.State.Name == types.InstanceStateNamePending && i.describes > f.BootDescribes {
			i.inst.State = state(types.InstanceStateNameRunning)
		}
	}
	var match []types.Instance
	for _, i := range f.instances {
		if len(in.InstanceIds) > 0 && !slices.Contains(in.InstanceIds, aws.ToString(i.inst.InstanceId)) {
			continue
		}
		ok, err := matches(i.inst, in.Filters)
		if err != nil {
			return nil, err
		}
		if ok {
			match = append(match, i.inst)
		}
	}
	start := 0
	if tok := aws.ToString(in.NextToken); tok != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(tok, "page-"))
		if err != nil || !strings.HasPrefix(tok, "page-") || n < 0 || n > len(match) {
			return nil, APIError("InvalidParameterValue", "Invalid NextToken")
		}
		start = n
	}
	size := defaultPageSize
	if in.MaxResults != nil {
		size = int(*in.MaxResults)
	}
	if f.PageSize > 0 {
		size = min(size, f.PageSize)
	}
	if len(in.InstanceIds) > 0 {
		size = len(match) + 1
	}
	end := min(start+size, len(match))
	out := &ec2.DescribeInstancesOutput{}
	for _, i := range match[start:end] {
		out.Reservations = append(out.Reservations, types.Reservation{Instances: []types.Instance{i}})
	}
	if end < len(match) {
		out.NextToken = aws.String("page-" + strconv.Itoa(end))
	}
	return out, nil
}

func matches(i types.Instance, filters []types.Filter) (bool, error) {
	for _, fl := range filters {
		name := aws.ToString(fl.Name)
		var have []string
		switch {
		case strings.HasPrefix(name, "tag:"):
			key := strings.TrimPrefix(name, "tag:")
			for _, t := range i.Tags {
				if aws.ToString(t.Key) == key {
					have = append(have, aws.ToString(t.Value))
				}
			}
		case name == "tag-key":
			for _, t := range i.Tags {
				have = append(have, aws.ToString(t.Key))
			}
		case name == "instance-state-name":
			have = []string{string(i.State.Name)}
		case name == "instance-id":
			have = []string{aws.ToString(i.InstanceId)}
		case name == "instance-type":
			have = []string{string(i.InstanceType)}
		case name == "subnet-id":
			have = []string{aws.ToString(i.SubnetId)}
		default:
			return false, APIError(CodeInvalid, fmt.Sprintf("The filter '%s' is invalid", name))
		}
		hit := false
		for _, v := range fl.Values {
			if slices.Contains(have, v) {
				hit = true
			}
		}
		if !hit {
			return false, nil
		}
	}
	return true, nil
}

// TerminateInstances terminates at once (state terminated, StateReason
// Client.UserInitiatedShutdown). An unknown id fails the whole call with
// InvalidInstanceID.NotFound, like EC2.
func (f *Fake) TerminateInstances(ctx context.Context, in *ec2.TerminateInstancesInput, _ ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error) {
	if f.TerminateHook != nil {
		if err := f.TerminateHook(in); err != nil {
			f.mu.Lock()
			f.record(OpTerminate, in, err)
			f.mu.Unlock()
			return nil, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out, err := f.terminate(ctx, in)
	f.record(OpTerminate, in, err)
	return out, err
}

func (f *Fake) terminate(ctx context.Context, in *ec2.TerminateInstancesInput) (*ec2.TerminateInstancesOutput, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := f.injected(OpTerminate); err != nil {
		return nil, err
	}
	if len(in.InstanceIds) == 0 {
		return nil, APIError(CodeMissing, "The request must contain the parameter InstanceId")
	}
	for _, id := range in.InstanceIds {
		if _, ok := f.byID[id]; !ok {
			return nil, APIError(CodeNotFound, fmt.Sprintf("The instance ID '%s' does not exist", id))
		}
	}
	out := &ec2.TerminateInstancesOutput{}
	for _, id := range in.InstanceIds {
		i := f.byID[id]
		prev := i.inst.State
		if prev.Name != types.InstanceStateNameTerminated {
			i.inst.State = state(types.InstanceStateNameTerminated)
			i.inst.StateReason = &types.StateReason{Code: aws.String(ReasonUser), Message: aws.String("Client.UserInitiatedShutdown: User initiated shutdown")}
		}
		out.TerminatingInstances = append(out.TerminatingInstances, types.InstanceStateChange{
			InstanceId: aws.String(id), PreviousState: prev, CurrentState: i.inst.State,
		})
	}
	return out, nil
}
